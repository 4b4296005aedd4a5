"""Preprocess the real random-exposure sets (Coat, Yahoo! R3) into implicit feedback.

PAPER.md "Data protocol": a rating >= threshold (4) is a positive, any other rating a
negative; training positives are R~ = 1 in the dense all-pairs matrix; the test set is the
random-exposure ratings, evaluated for the users `evaluable_users` selects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ubo_core.config import REAL_DATASETS, check_dataset
from ubo_core.data import FeedbackData, evaluable_users
from ubo_core.datasets.readers import Ratings, read_rating_matrix, read_rating_table
from ubo_core.errors import DataError

COAT_SHAPE = (290, 300)
YAHOO_SHAPE = (15_400, 1_000)
YAHOO_TRAIN = "ydata-ymusic-rating-study-v1_0-train.txt"
YAHOO_TEST = "ydata-ymusic-rating-study-v1_0-test.txt"


def read_real(name: str, folder: Path) -> tuple[Ratings, Ratings, tuple[int, int]]:
    """(train ratings, test ratings, (n_users, n_items)) of a real data set's raw folder."""
    check_dataset(name, REAL_DATASETS)
    if name == "coat":
        shape = COAT_SHAPE
        train = read_rating_matrix(folder / "train.ascii", shape)
        test = read_rating_matrix(folder / "test.ascii", shape)
    else:
        shape = YAHOO_SHAPE
        train = read_rating_table(folder / YAHOO_TRAIN, *shape)
        test = read_rating_table(folder / YAHOO_TEST, *shape)
    return train, test, shape


def to_feedback(
    train: Ratings, test: Ratings, shape: tuple[int, int], positive_threshold: int, where: Path
) -> FeedbackData:
    """Binarise ratings (>= threshold is positive) and select the evaluated users."""
    n_users, n_items = shape
    train_label = (train.rating >= positive_threshold).astype(np.int8)
    test_label = (test.rating >= positive_threshold).astype(np.int8)
    data = FeedbackData(
        n_users=n_users,
        n_items=n_items,
        train_user=train.user,
        train_item=train.item,
        train_label=train_label,
        test_user=test.user,
        test_item=test.item,
        test_label=test_label,
        eval_users=evaluable_users(n_users, train.user[train_label == 1], test.user, test_label),
    )
    data.check(where)
    return data


def preprocess_real(name: str, raw_folder: Path, positive_threshold: int) -> FeedbackData:
    """The preprocess stage's science: raw folder -> checked implicit feedback."""
    if not raw_folder.is_dir():
        raise DataError(raw_folder, f"raw data missing; run `dvc repro download@{name}` first")
    train, test, shape = read_real(name, raw_folder)
    return to_feedback(train, test, shape, positive_threshold, raw_folder)
