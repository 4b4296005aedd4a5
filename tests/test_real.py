"""ubo_core.datasets.real: binarised ratings, evaluated users, the preprocess entry point."""

from __future__ import annotations

import numpy as np
import pytest

from ubo_core.config import Params
from ubo_core.datasets.readers import Ratings, RealFeedback
from ubo_core.datasets.real import COAT_SHAPE, YAHOO_TEST, YAHOO_TRAIN, preprocess_real, to_feedback
from ubo_core.datasets.registry import get_dataset
from ubo_core.errors import DataError

COAT = get_dataset(Params(), "coat")
YAHOO = get_dataset(Params(), "yahoo")


def ratings(user, item, rating) -> Ratings:
    return Ratings(np.array(user, np.int32), np.array(item, np.int32), np.array(rating, np.int8))


# 4 users x 3 items.
# train: (0,0,5) (0,1,3) (1,0,4) (2,2,2) (3,1,4) -> labels 1 0 1 0 1 (rating >= 4; 4 counts,
#        3 does not); training positives of users 0, 1, 3.
# test:  (0,1,5) (0,2,1)   user 0: test pos + test neg + train pos -> evaluated
#        (1,1,4) (1,2,4)   user 1: no test negative              -> not evaluated
#        (2,0,5) (2,1,2)   user 2: no training positive (cold)   -> not evaluated
#        (3,0,3) (3,2,4)   user 3: all three                     -> evaluated
TRAIN = ratings([0, 0, 1, 2, 3], [0, 1, 0, 2, 1], [5, 3, 4, 2, 4])
TEST = ratings([0, 0, 1, 1, 2, 2, 3, 3], [1, 2, 1, 2, 0, 1, 0, 2], [5, 1, 4, 4, 5, 2, 3, 4])


def test_to_feedback_labels_and_evaluated_users(tmp_path):
    data = to_feedback(RealFeedback(TRAIN, TEST, (4, 3)), 4, tmp_path)
    np.testing.assert_array_equal(data.train_label, [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(data.test_label, [1, 0, 1, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(data.eval_users, [0, 3])
    assert data.train_label.dtype == np.int8 and data.eval_users.dtype == np.int32
    assert not data.is_semisynthetic and not data.has_validation
    assert data.counts() == {
        "n_users": 4,
        "n_items": 3,
        "n_train_ratings": 5,
        "n_train_pos": 3,
        "n_test_ratings": 8,
        "n_test_pos": 5,  # ratings 5, 4, 4, 5, 4
        "n_eval_users": 2,
    }


def test_to_feedback_threshold_5(tmp_path):
    # threshold 5: train labels 1 0 0 0 0 (only the 5); user 0 alone has a training positive,
    # and has test 5 (pos) and 1 (neg) -> eval_users [0]
    data = to_feedback(RealFeedback(TRAIN, TEST, (4, 3)), 5, tmp_path)
    np.testing.assert_array_equal(data.train_label, [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(data.eval_users, [0])


def test_to_feedback_without_evaluable_user_names_the_folder(tmp_path):
    # user 1 only: test ratings 4 and 4, no test negative
    test = ratings([1, 1], [1, 2], [4, 4])
    with pytest.raises(DataError) as info:
        to_feedback(RealFeedback(TRAIN, test, (4, 3)), 4, tmp_path / "coat")
    assert str(info.value) == f"{tmp_path / 'coat'}: no user qualifies for evaluation"


def _matrix_text(shape, cells) -> str:
    matrix = np.zeros(shape, np.int64)
    for (u, i), r in cells.items():
        matrix[u, i] = r
    return "".join(" ".join(map(str, row)) + "\n" for row in matrix)


def test_preprocess_coat_end_to_end(tmp_path):
    folder = tmp_path / "coat"
    folder.mkdir()
    train = {(0, 0): 5, (0, 1): 2, (5, 7): 4, (289, 299): 1}
    test = {(0, 2): 5, (0, 3): 1, (5, 8): 3, (5, 9): 4, (6, 1): 5, (6, 2): 2}
    (folder / "train.ascii").write_text(_matrix_text(COAT_SHAPE, train))
    (folder / "test.ascii").write_text(_matrix_text(COAT_SHAPE, test))
    data = preprocess_real(COAT, folder, positive_threshold=4)
    # train positives: (0,0) (5,7). Evaluated: 0 (test 5 and 1), 5 (test 3 and 4);
    # user 6 has test 5 and 2 but no training positive.
    np.testing.assert_array_equal(data.eval_users, [0, 5])
    assert data.counts() == {
        "n_users": 290,
        "n_items": 300,
        "n_train_ratings": 4,
        "n_train_pos": 2,
        "n_test_ratings": 6,
        "n_test_pos": 3,
        "n_eval_users": 2,
    }
    np.testing.assert_array_equal(data.train_user, [0, 0, 5, 289])
    np.testing.assert_array_equal(data.train_item, [0, 1, 7, 299])


def test_preprocess_yahoo_end_to_end(tmp_path):
    folder = tmp_path / "yahoo"
    folder.mkdir()
    # 1-based ids; user 15400 and item 1000 are the largest valid ones
    (folder / YAHOO_TRAIN).write_text("1\t1\t5\n1\t2\t1\n15400\t1000\t4\n")
    (folder / YAHOO_TEST).write_text("1\t3\t4\n1\t4\t2\n15400\t5\t1\n15400\t6\t5\n2\t1\t5\n")
    data = preprocess_real(YAHOO, folder, positive_threshold=4)
    assert (data.n_users, data.n_items) == (15_400, 1_000)
    # 0-based: user 0 (train pos item 0; test 4 and 2) and user 15399 (train pos; test 1
    # and 5) are evaluated; user 1 has no training positive.
    np.testing.assert_array_equal(data.eval_users, [0, 15_399])
    np.testing.assert_array_equal(data.train_label, [1, 0, 1])
    np.testing.assert_array_equal(data.test_label, [1, 0, 0, 1, 1])


def test_preprocess_real_missing_folder_names_the_dvc_command(tmp_path):
    folder = tmp_path / "raw" / "coat"
    with pytest.raises(DataError) as info:
        preprocess_real(COAT, folder, 4)
    assert str(info.value) == f"{folder}: raw data missing; run `dvc repro download@coat` first"


def test_preprocess_real_missing_file_is_named(tmp_path):
    folder = tmp_path / "coat"
    folder.mkdir()
    (folder / "train.ascii").write_text(_matrix_text(COAT_SHAPE, {(0, 0): 5}))
    with pytest.raises(DataError) as info:
        preprocess_real(COAT, folder, 4)
    assert str(info.value) == f"{folder / 'test.ascii'}: file not found"


def test_clicks_are_their_own_label(tmp_path):
    clicks = Ratings(
        np.array([0, 1], np.int32),
        np.array([0, 1], np.int32),
        np.array([1, 0], np.int8),
        clicks=True,
    )
    np.testing.assert_array_equal(clicks.labels(positive_threshold=4), [1, 0])
