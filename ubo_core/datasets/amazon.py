"""Amazon CDs: derive the implicit-interaction subset from the 2014 review data.

The filter is the one of the public HGN preparation (Ma et al. 2019), whose prepared subset
the offline mirror holds: ratings >= 4 kept as interactions; users with >= 5 interactions,
then items with >= 8; items without a 5-core review longer than 10 characters dropped;
users with >= 10 distinct items kept; each user's items in time order.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pandas as pd

from ubo_core.datasets.sources import AMAZON_CDS_PAIRS_SHA256
from ubo_core.errors import DataError
from ubo_core.fileio import atomic_path

MIN_RATING = 4
MIN_USER_FIRST = 5
MIN_ITEM = 8
MIN_USER_DISTINCT = 10
MIN_REVIEW_CHARS = 10


def derive_cds_subset(
    ratings_csv: Path,
    reviews_5core: Path,
    out_tsv: Path,
    expected_pairs_sha256: str | None = (AMAZON_CDS_PAIRS_SHA256),
) -> None:
    """Write `user<TAB>item` rows of the HGN subset; check the pairs' sha256 if given."""
    try:
        ratings = pd.read_csv(
            ratings_csv,
            names=["user", "item", "rating", "timestamp"],
            dtype={"user": str, "item": str, "rating": float, "timestamp": "int64"},
        )
    except (ValueError, pd.errors.ParserError) as error:
        raise DataError(ratings_csv, f"malformed ratings CSV ({error})") from error
    ratings = ratings[ratings["rating"] >= MIN_RATING]
    user_counts = ratings["user"].value_counts()
    ratings = ratings[ratings["user"].isin(user_counts.index[user_counts >= MIN_USER_FIRST])]
    item_counts = ratings["item"].value_counts()
    ratings = ratings[ratings["item"].isin(item_counts.index[item_counts >= MIN_ITEM])]
    ratings = ratings[ratings["item"].isin(_items_with_review(reviews_5core))]
    # Stable sort: equal timestamps keep file order (the original used an unstable sort,
    # hence the order-free pairs checksum below).
    ratings = ratings.sort_values("timestamp", kind="mergesort")
    distinct = ratings.groupby("user")["item"].nunique()
    ratings = ratings[ratings["user"].isin(distinct.index[distinct >= MIN_USER_DISTINCT])]
    ratings = ratings.sort_values("user", kind="mergesort")
    if ratings.empty:
        raise DataError(ratings_csv, "the HGN filter keeps no interaction")
    with atomic_path(out_tsv) as tmp:
        ratings[["user", "item"]].to_csv(tmp, sep="\t", index=False)
    if expected_pairs_sha256 is not None:
        digest = pairs_sha256(out_tsv)
        if digest != expected_pairs_sha256:
            out_tsv.unlink()
            raise DataError(
                out_tsv,
                f"derived subset differs from the recorded one: pairs sha256 {digest}, "
                f"expected {expected_pairs_sha256}",
            )


def _items_with_review(reviews_5core: Path) -> set[str]:
    items: set[str] = set()
    try:
        with gzip.open(reviews_5core, "rt") as handle:
            for line_number, line in enumerate(handle, start=1):
                try:
                    review = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(reviews_5core, f"line {line_number}: bad JSON") from error
                if len(review.get("reviewText", "")) > MIN_REVIEW_CHARS:
                    items.add(review["asin"])
    except (OSError, EOFError) as error:
        raise DataError(reviews_5core, f"unreadable gzip ({error})") from error
    return items


def pairs_sha256(tsv: Path) -> str:
    """sha256 of the sorted distinct `user\\titem` lines of a file with a header line."""
    with open(tsv) as handle:
        next(handle, None)
        lines = sorted({line.rstrip("\r\n") for line in handle if line.strip()})
    return hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()
