"""Strict readers of the raw files. Each problem is a DataError naming the file and line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ubo_core.errors import DataError

MIN_RATING, MAX_RATING = 1, 5
ML100K_SHAPE = (943, 1_682)


@dataclass(frozen=True)
class Ratings:
    """Explicit ratings as 0-based (user, item, rating) triples, (n,) arrays; with `clicks`,
    `rating` is a 0/1 click (your own CSV data's `click` column) and is the label itself."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    clicks: bool = False

    def labels(self, positive_threshold: int) -> np.ndarray:
        """1 for a positive (rating >= threshold, or a click), else 0; int8."""
        positive = self.rating == 1 if self.clicks else self.rating >= positive_threshold
        return positive.astype(np.int8)


@dataclass(frozen=True)
class RealFeedback:
    """What a real data set's raw files hold: training feedback, a random-exposure test set
    and the (n_users, n_items) id space both index."""

    train: Ratings
    test: Ratings
    shape: tuple[int, int]


@dataclass(frozen=True)
class Interactions:
    """A semi-synthetic source: 0-based (user, item) pairs with ratings 1..5 (ML-100K: the
    relevance is fitted to them) or without (Amazon CDs: interactions only). `shape` bounds
    the ids (the ids need not all occur)."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray | None
    shape: tuple[int, int]


def read_rating_matrix(path: Path, shape: tuple[int, int]) -> Ratings:
    """A dense whitespace-separated rating matrix (Coat), 0 = unrated, 1..5 = a rating."""
    if not path.is_file():
        raise DataError(path, "file not found")
    rows, line_numbers = [], []
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            line_numbers.append(line_number)
            try:
                rows.append([int(x) for x in fields])
            except ValueError:
                raise DataError(
                    path, f"line {line_number}: non-integer rating in {line.strip()[:60]!r}"
                ) from None
            if len(fields) != shape[1]:
                raise DataError(
                    path, f"line {line_number}: {len(fields)} columns, expected {shape[1]}"
                )
    matrix = (
        np.asarray(rows, dtype=np.int64).reshape(-1, shape[1]) if rows else np.zeros((0, shape[1]))
    )
    if matrix.shape != shape:
        raise DataError(path, f"matrix shape {matrix.shape}, expected {shape}")
    bad = (matrix != 0) & ((matrix < MIN_RATING) | (matrix > MAX_RATING))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            path,
            f"line {line_numbers[row]}: rating {matrix[row, col]} out of range 0..{MAX_RATING}",
        )
    user, item = np.nonzero(matrix)
    if user.size == 0:
        raise DataError(path, "no ratings")
    return Ratings(user.astype(np.int32), item.astype(np.int32), matrix[user, item].astype(np.int8))


def read_rating_table(
    path: Path, n_users: int, n_items: int, n_columns: int = 3, one_based: bool = True
) -> Ratings:
    """A tab-separated `user item rating [...]` table with integer ids (Yahoo! R3, ML-100K)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        # Blank lines are kept, then dropped by hand, so row k stays file line k + 1.
        table = pd.read_csv(
            path, sep="\t", header=None, dtype=str, keep_default_na=False, skip_blank_lines=False
        ).fillna("")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(path, f"malformed table ({error})") from error
    if table.shape[1] != n_columns:
        raise DataError(path, f"{table.shape[1]} columns, expected {n_columns}")
    table = table[~(table == "").all(axis=1)]
    line_of = table.index.to_numpy() + 1
    values = table.iloc[:, :3].apply(pd.to_numeric, errors="coerce")
    empty_field = (table == "").any(axis=1)
    bad_rows = empty_field | values.isna().any(axis=1) | (values != values.round()).any(axis=1)
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows.to_numpy())[0])
        shown = "\t".join(table.iloc[row].tolist())[:60]
        raise DataError(path, f"line {line_of[row]}: non-integer field in {shown!r}")
    triples = values.to_numpy(dtype=np.int64)
    offset = 1 if one_based else 0
    user, item, rating = triples[:, 0] - offset, triples[:, 1] - offset, triples[:, 2]
    _check_range(path, "user id", user, n_users, offset, line_of)
    _check_range(path, "item id", item, n_items, offset, line_of)
    out_of_range = (rating < MIN_RATING) | (rating > MAX_RATING)
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise DataError(
            path,
            f"line {line_of[row]}: rating {rating[row]} out of range {MIN_RATING}..{MAX_RATING}",
        )
    check_duplicates(path, user, item, n_items, line_of)
    if user.size == 0:
        raise DataError(path, "no ratings")
    return Ratings(user.astype(np.int32), item.astype(np.int32), rating.astype(np.int8))


def read_interactions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A `user<TAB>item` file with a header and string ids (Amazon CDs).

    Returns (user_index, item_index, user_names, item_names); indices follow sorted names.
    """
    if not path.is_file():
        raise DataError(path, "file not found")
    with open(path) as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
    if header != ["user", "item"]:
        raise DataError(path, f"header {header}, expected ['user', 'item']")
    try:
        # header=None and a column count check: with a header row, pandas would silently
        # take an extra field for an index column.
        table = pd.read_csv(
            path, sep="\t", header=None, skiprows=1, dtype=str, keep_default_na=False
        )
    except pd.errors.EmptyDataError:
        raise DataError(path, "no interactions") from None
    except pd.errors.ParserError as error:
        raise DataError(path, f"malformed table ({error})") from error
    if table.shape[1] != 2:
        raise DataError(path, f"{table.shape[1]} fields per line, expected 2 (user, item)")
    table.columns = ["user", "item"]
    empty = (table["user"] == "") | (table["item"] == "")
    if empty.any():
        raise DataError(path, f"line {int(np.flatnonzero(empty.to_numpy())[0]) + 2}: empty id")
    user_names, user = np.unique(table["user"].to_numpy(), return_inverse=True)
    item_names, item = np.unique(table["item"].to_numpy(), return_inverse=True)
    check_duplicates(path, user, item, item_names.size, np.arange(user.size) + 2)
    if user.size == 0:
        raise DataError(path, "no interactions")
    return user.astype(np.int32), item.astype(np.int32), user_names, item_names


def _check_range(
    path: Path, what: str, ids: np.ndarray, limit: int, offset: int, line_of: np.ndarray
) -> None:
    bad = (ids < 0) | (ids >= limit)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        first, last = offset, limit - 1 + offset
        raise DataError(
            path, f"line {line_of[row]}: {what} {ids[row] + offset} out of range [{first}, {last}]"
        )


def check_duplicates(
    path: Path, user: np.ndarray, item: np.ndarray, n_items: int, line_of: np.ndarray
) -> None:
    keys = user.astype(np.int64) * n_items + item
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        key = int(np.flatnonzero(counts > 1)[0])
        duplicate_rows = np.flatnonzero(keys == keys[first[key]])
        raise DataError(
            path,
            f"duplicate (user, item) on lines {line_of[duplicate_rows[:2]].tolist()}",
        )


# -- the semi-synthetic built-ins' sources (ubo_core/datasets/registry.py) ------------------
def read_ml100k(folder: Path) -> Interactions:
    """ML-100K's ratings (u.data: user, item, rating, timestamp; 1-based ids)."""
    ratings = read_rating_table(folder / "u.data", *ML100K_SHAPE, n_columns=4)
    return Interactions(ratings.user, ratings.item, ratings.rating, ML100K_SHAPE)


def read_amazon_cds(folder: Path) -> Interactions:
    """The Amazon CDs subset's interactions (cds_interactions.tsv; no ratings)."""
    user, item, user_names, item_names = read_interactions(folder / "cds_interactions.tsv")
    return Interactions(user, item, None, (user_names.size, item_names.size))
