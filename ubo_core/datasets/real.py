"""Preprocess the real random-exposure sets (Coat, Yahoo! R3) into implicit feedback.

PAPER.md "Data protocol": a rating >= threshold (4) is a positive, any other rating a
negative; training positives are R~ = 1 in the dense all-pairs matrix; the test set is the
random-exposure ratings, evaluated for the users `evaluable_users` selects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ubo_core.data import FeedbackData, evaluable_users
from ubo_core.datasets.readers import RealFeedback, read_rating_matrix, read_rating_table
from ubo_core.errors import DataError

if TYPE_CHECKING:
    from ubo_core.datasets.dataset import Dataset

COAT_SHAPE = (290, 300)
YAHOO_SHAPE = (15_400, 1_000)
YAHOO_TRAIN = "ydata-ymusic-rating-study-v1_0-train.txt"
YAHOO_TEST = "ydata-ymusic-rating-study-v1_0-test.txt"


def read_coat(folder: Path) -> RealFeedback:
    """Coat's dense rating matrices (train.ascii, test.ascii)."""
    train = read_rating_matrix(folder / "train.ascii", COAT_SHAPE)
    test = read_rating_matrix(folder / "test.ascii", COAT_SHAPE)
    return RealFeedback(train, test, COAT_SHAPE)


def read_yahoo(folder: Path) -> RealFeedback:
    """Yahoo! R3's user-selected (train) and random (test) rating tables."""
    train = read_rating_table(folder / YAHOO_TRAIN, *YAHOO_SHAPE)
    test = read_rating_table(folder / YAHOO_TEST, *YAHOO_SHAPE)
    return RealFeedback(train, test, YAHOO_SHAPE)


def to_feedback(raw: RealFeedback, positive_threshold: int, where: Path) -> FeedbackData:
    """Binarise ratings (>= threshold is positive; a click is its own label) and select the
    evaluated users."""
    n_users, n_items = raw.shape
    train, test = raw.train, raw.test
    train_label = train.labels(positive_threshold)
    test_label = test.labels(positive_threshold)
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


def preprocess_real(dataset: Dataset, raw_folder: Path, positive_threshold: int) -> FeedbackData:
    """The prepare stage's science for a real data set: raw folder -> checked feedback."""
    if not raw_folder.is_dir():
        raise DataError(
            raw_folder, f"raw data missing; run `dvc repro download@{dataset.name}` first"
        )
    raw = dataset.read(raw_folder)
    assert isinstance(raw, RealFeedback), dataset
    return to_feedback(raw, positive_threshold, raw_folder)
