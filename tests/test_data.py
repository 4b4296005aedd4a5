"""ubo_core.data: FeedbackData checks, summary counts and the .npz round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ubo_core.data import FeedbackData, evaluable_users
from ubo_core.errors import DataError
from ubo_core.fileio import load_npz, save_npz

WHERE = "somewhere/dataset.npz"


def check_error(data: FeedbackData) -> str:
    with pytest.raises(DataError) as info:
        data.check(WHERE)
    return str(info.value)


def arr(values, dtype=np.int32) -> np.ndarray:
    return np.array(values, dtype)


def test_tiny_feedback_is_valid_and_summarised(tiny_feedback):
    tiny_feedback.check(WHERE)
    assert tiny_feedback.counts() == {
        "n_users": 3,
        "n_items": 4,
        "n_train_ratings": 6,
        "n_train_pos": 4,
        "n_test_ratings": 5,
        "n_test_pos": 3,
        "n_eval_users": 1,
    }


def test_popularity_activity_and_positives(tiny_feedback):
    users, items = tiny_feedback.train_positives()
    # positives (0,0) (1,0) (1,1) (2,2)
    np.testing.assert_array_equal(users, [0, 1, 1, 2])
    np.testing.assert_array_equal(items, [0, 0, 1, 2])
    np.testing.assert_array_equal(tiny_feedback.item_popularity(), [2, 1, 1, 0])
    np.testing.assert_array_equal(tiny_feedback.user_activity(), [1, 2, 1])


def test_evaluable_users_needs_test_pos_test_neg_and_train_pos(tiny_feedback):
    d = tiny_feedback
    users, _ = d.train_positives()
    np.testing.assert_array_equal(evaluable_users(3, users, d.test_user, d.test_label), [0])
    # give user 1 a test negative (it has test positives and training positives): [0, 1]
    test_user, test_label = np.append(d.test_user, 1), np.append(d.test_label, 0)
    np.testing.assert_array_equal(evaluable_users(3, users, test_user, test_label), [0, 1])


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"train_label": arr([1, 0, 2, 1, 1, 0], np.int8)},
            "train_label has values other than 0 and 1",
        ),
        (
            {"test_label": arr([1, 0, 1, 1, -1], np.int8)},
            "test_label has values other than 0 and 1",
        ),
        ({"train_user": arr([0, 0, 1, 1, 3, 2])}, "train_user ids out of range [0, 3)"),
        ({"test_item": arr([2, 4, 0, 2, 1])}, "test_item ids out of range [0, 4)"),
        ({"test_item": arr([2, -1, 0, 2, 1])}, "test_item ids out of range [0, 4)"),
        # (1, 1) twice: train_item [0, 1, 1, 1, 2, 3] with users [0, 0, 1, 1, 2, 2]
        ({"train_item": arr([0, 1, 1, 1, 2, 3])}, "duplicate (user, item) pairs in train"),
        (
            {"test_user": arr([], np.int32), "test_item": arr([]), "test_label": arr([], np.int8)},
            "the test split is empty",
        ),
        ({"test_label": arr([0, 0, 0, 0, 0], np.int8)}, "the test split has no positive"),
        ({"train_label": arr([0, 0, 0, 0, 0, 0], np.int8)}, "the training split has no positive"),
        ({"train_label": arr([1, 0, 1], np.int8)}, "train_label has shape (3,), expected (6,)"),
        ({"test_item": arr([2, 3, 0, 2])}, "test_user/test_item shapes (5,) and (4,)"),
        ({"eval_users": arr([], np.int32)}, "no user qualifies for evaluation"),
        ({"eval_users": arr([0, 3])}, "eval_users out of range"),
        ({"n_users": 0}, "empty matrix 0 x 4"),
    ],
)
def test_check_errors_name_the_place_and_problem(tiny_feedback, changes, problem):
    message = check_error(dataclasses.replace(tiny_feedback, **changes))
    assert message == f"{WHERE}: {problem}"


def _with_truth(data: FeedbackData, exposure: np.ndarray) -> FeedbackData:
    relevance = np.full((3, 4), 0.5, np.float32)
    return dataclasses.replace(data, true_relevance=relevance, true_exposure=exposure)


def test_check_true_exposure_with_nan(tiny_feedback):
    exposure = np.full((3, 4), 0.25, np.float32)
    exposure[1, 2] = np.nan
    message = check_error(_with_truth(tiny_feedback, exposure))
    assert message == f"{WHERE}: true_exposure must be probabilities in [0, 1] without NaN"


def test_check_true_exposure_above_one(tiny_feedback):
    exposure = np.full((3, 4), 0.25, np.float32)
    exposure[0, 0] = 1.5
    assert "true_exposure must be probabilities" in check_error(
        _with_truth(tiny_feedback, exposure)
    )


def test_check_true_exposure_wrong_shape(tiny_feedback):
    exposure = np.full((4, 3), 0.25, np.float32)  # transposed
    message = check_error(_with_truth(tiny_feedback, exposure))
    assert message == f"{WHERE}: true_exposure has shape (4, 3), expected (3, 4)"


def test_check_duplicate_in_validation_group(tiny_feedback):
    data = dataclasses.replace(
        tiny_feedback,
        val_user=arr([0, 0]),
        val_item=arr([3, 3]),
        val_label=arr([1, 0], np.int8),
        hyper_user=arr([1, 1]),
        hyper_item=arr([2, 3]),
        hyper_label=arr([1, 0], np.int8),
        excluded_user=arr([0, 1, 1]),
        excluded_item=arr([3, 2, 3]),
    )
    assert check_error(data) == f"{WHERE}: duplicate (user, item) pairs in val"


def with_everything(data: FeedbackData) -> FeedbackData:
    """tiny_feedback plus truth matrices and validation groups (all optional fields set)."""
    return dataclasses.replace(
        data,
        true_relevance=np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4),
        true_exposure=np.linspace(1, 0, 12, dtype=np.float32).reshape(3, 4),
        val_user=arr([0, 0]),
        val_item=arr([2, 3]),
        val_label=arr([1, 0], np.int8),
        hyper_user=arr([1, 1]),
        hyper_item=arr([2, 3]),
        hyper_label=arr([1, 0], np.int8),
        excluded_user=arr([0, 0, 1, 1]),
        excluded_item=arr([2, 3, 2, 3]),
    )


def assert_same(a: FeedbackData, b: FeedbackData) -> None:
    for field in dataclasses.fields(FeedbackData):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if x is None:
            assert y is None, field.name
            continue
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype or field.name in ("n_users", "n_items"), field.name
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("full", [False, True])
def test_save_load_round_trip(tmp_path, tiny_feedback, full):
    data = with_everything(tiny_feedback) if full else tiny_feedback
    path = tmp_path / "dataset.npz"
    data.save(path)
    loaded = FeedbackData.load(path)
    assert_same(data, loaded)
    assert type(loaded.n_users) is int and loaded.n_users == 3
    assert loaded.is_semisynthetic == full and loaded.has_validation == full
    assert loaded.counts() == data.counts()


def test_counts_with_truth_and_validation(tiny_feedback):
    counts = with_everything(tiny_feedback).counts()
    # true_relevance = linspace(0, 1, 12) has mean 0.5; true_exposure = linspace(1, 0, 12) too
    assert counts["mean_true_relevance"] == 0.5 and counts["mean_true_exposure"] == 0.5
    # val: 2 pairs of user 0, 1 positive; hyper: 2 pairs of user 1, 1 positive;
    # excluded 4 pairs; dense 3 * 4 - 4 = 8
    assert {k: v for k, v in counts.items() if k.startswith(("n_val", "n_hyper"))} == {
        "n_val_pairs": 2,
        "n_val_pos": 1,
        "n_val_users": 1,
        "n_hyper_pairs": 2,
        "n_hyper_pos": 1,
        "n_hyper_users": 1,
    }
    assert counts["n_excluded_pairs"] == 4 and counts["n_dense_train_pairs"] == 8


def test_save_is_byte_reproducible(tmp_path, tiny_feedback):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    tiny_feedback.save(first)
    tiny_feedback.save(second)
    assert first.read_bytes() == second.read_bytes()


def test_load_with_an_unexpected_array(tmp_path, tiny_feedback):
    path = tmp_path / "dataset.npz"
    tiny_feedback.save(path)
    arrays = load_npz(path)
    save_npz(path, {**arrays, "surprise": np.zeros(2), "another": np.ones(1)})
    with pytest.raises(DataError) as info:
        FeedbackData.load(path)
    assert str(info.value) == f"{path}: unexpected arrays ['another', 'surprise']"


def test_load_with_a_missing_array(tmp_path, tiny_feedback):
    path = tmp_path / "dataset.npz"
    tiny_feedback.save(path)
    arrays = load_npz(path)
    del arrays["eval_users"]
    save_npz(path, arrays)
    with pytest.raises(DataError) as info:
        FeedbackData.load(path)
    assert str(info.value) == f"{path}: missing arrays ['eval_users']"


def test_load_runs_the_checks_and_names_the_file(tmp_path, tiny_feedback):
    path = tmp_path / "dataset.npz"
    dataclasses.replace(tiny_feedback, test_item=arr([2, 3, 0, 2, 9])).save(path)
    with pytest.raises(DataError) as info:
        FeedbackData.load(path)
    assert str(info.value) == f"{path}: test_item ids out of range [0, 4)"


def test_load_with_a_half_written_validation_group(tmp_path, tiny_feedback):
    path = tmp_path / "dataset.npz"
    dataclasses.replace(tiny_feedback, val_user=arr([0]), val_item=arr([3])).save(path)
    with pytest.raises(DataError) as info:
        FeedbackData.load(path)
    assert str(path) in str(info.value)


def test_check_refuses_validation_without_hyper_and_excluded(tiny_feedback):
    data = dataclasses.replace(
        tiny_feedback, val_user=arr([0]), val_item=arr([3]), val_label=arr([0], np.int8)
    )
    with pytest.raises(DataError):
        data.check(WHERE)
