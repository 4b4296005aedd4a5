"""Your own implicit feedback as CSV files (params.yaml `catalog.<name>`, docs/EXTENDING.md).

Each file has a header and one row per (user, item) pair, comma-separated:

    user,item[,rating|click][,timestamp]

- `user`, `item`: any non-empty strings (ids are mapped to 0..n-1 in sorted order, over the
  training and test files together, so both index the same users and items);
- `rating`: a number in 1..5, positive when >= preprocess.positive_threshold; or `click`:
  0 or 1. Without either column every row is a click (what implicit feedback logs hold). A
  test file needs one of them: a random-exposure test set has negatives.
- `timestamp`: a number; checked, then unused (no method here orders feedback in time).

Same checks as the built-in readers: a bad header, an empty id, a non-numeric or
out-of-range value, a duplicate (user, item) or an empty file stops with one line naming the
file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ubo_core.datasets.readers import (
    MAX_RATING,
    MIN_RATING,
    Interactions,
    Ratings,
    RealFeedback,
    check_duplicates,
)
from ubo_core.errors import DataError

ID_COLUMNS = ("user", "item")
LABEL_COLUMNS = ("rating", "click")
OPTIONAL_COLUMNS = (*LABEL_COLUMNS, "timestamp")


@dataclass(frozen=True)
class FeedbackTable:
    """One CSV file, checked: string ids, and the label column (or None) as floats."""

    path: Path
    user: np.ndarray
    item: np.ndarray
    label_column: str | None  # "rating", "click" or None (every row a click)
    value: np.ndarray | None
    line: np.ndarray  # the file line of each row (header = line 1)


def read_feedback_csv(path: Path) -> FeedbackTable:
    if not path.is_file():
        raise DataError(path, "file not found (params.yaml's catalog names it)")
    try:
        # header=None: with a header row, pandas would silently take an extra field of a row
        # for an index column. Blank lines are kept, then dropped, so row k is file line k + 1.
        table = pd.read_csv(
            path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=False
        ).fillna("")
        table = table.apply(lambda column: column.str.strip())  # "u1, item2" is "u1,item2"
    except pd.errors.EmptyDataError:
        raise DataError(path, "empty file; expected a header user,item[,rating|click]") from None
    except pd.errors.ParserError as error:
        raise DataError(path, f"malformed CSV ({error})") from error
    header = list(table.iloc[0])
    table = table.iloc[1:]
    table = table[~(table == "").all(axis=1)]
    table.columns = header
    unknown = [c for c in header if c not in (*ID_COLUMNS, *OPTIONAL_COLUMNS)]
    labels = [c for c in header if c in LABEL_COLUMNS]
    if (
        header[:2] != list(ID_COLUMNS)
        or unknown
        or len(labels) > 1
        or len(set(header)) != len(header)
    ):
        raise DataError(
            path,
            f"header {header}; expected user,item then optionally one of rating or click, "
            "and timestamp",
        )
    if table.empty:
        raise DataError(path, "no rows")
    line = table.index.to_numpy() + 1
    for column in ID_COLUMNS:
        empty = table[column] == ""
        if empty.any():
            raise DataError(path, f"line {line[int(np.flatnonzero(empty)[0])]}: empty {column}")
    numbers = {
        column: pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
        for column in header[2:]
    }
    for column, values in numbers.items():
        bad = ~np.isfinite(values)
        if column == "rating":
            bad |= (values < MIN_RATING) | (values > MAX_RATING)
            expected = f"a number in {MIN_RATING}..{MAX_RATING}"
        elif column == "click":
            bad |= (values != 0) & (values != 1)
            expected = "0 or 1"
        else:
            expected = "a number"
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                path, f"line {line[row]}: {column} {table[column].iloc[row]!r}, expected {expected}"
            )
    label = labels[0] if labels else None
    return FeedbackTable(
        path,
        table["user"].to_numpy(dtype=str),
        table["item"].to_numpy(dtype=str),
        label,
        numbers[label] if label else None,
        line,
    )


def _index(
    tables: list[FeedbackTable],
) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[int, int]]:
    """Each table's (user, item) as 0-based indices over the sorted union of the ids."""
    users = np.unique(np.concatenate([t.user for t in tables]))
    items = np.unique(np.concatenate([t.item for t in tables]))
    indexed = []
    for t in tables:
        user = np.searchsorted(users, t.user).astype(np.int32)
        item = np.searchsorted(items, t.item).astype(np.int32)
        check_duplicates(t.path, user, item, items.size, t.line)
        indexed.append((user, item))
    return indexed, (users.size, items.size)


def _ratings(table: FeedbackTable, user: np.ndarray, item: np.ndarray) -> Ratings:
    if table.label_column == "rating":
        assert table.value is not None
        # int8 like the built-in ratings; a fractional rating keeps its threshold side.
        return Ratings(user, item, np.floor(table.value).astype(np.int8))
    value = table.value if table.value is not None else np.ones(user.size)
    return Ratings(user, item, value.astype(np.int8), clicks=True)


def read_csv_real(folder: Path, train: str, test: str) -> RealFeedback:
    """A real data set of your own: training feedback and a random-exposure test file."""
    train_table = read_feedback_csv(folder / train)
    test_table = read_feedback_csv(folder / test)
    if test_table.label_column is None:
        raise DataError(
            test_table.path, "no rating or click column: a random-exposure test needs labels"
        )
    ((train_user, train_item), (test_user, test_item)), shape = _index([train_table, test_table])
    return RealFeedback(
        _ratings(train_table, train_user, train_item),
        _ratings(test_table, test_user, test_item),
        shape,
    )


def read_csv_source(folder: Path, train: str) -> Interactions:
    """The source of a semi-synthetic data set of your own: with ratings, every row; with
    clicks, the rows clicked; without either, every row."""
    table = read_feedback_csv(folder / train)
    ((user, item),), shape = _index([table])
    if table.label_column == "click":
        assert table.value is not None
        clicked = table.value == 1
        if not clicked.any():
            raise DataError(table.path, "no row with click 1")
        return Interactions(user[clicked], item[clicked], None, shape)
    return Interactions(user, item, table.value, shape)
