"""ubo_core.datasets.validation: the unbiased validation and hyper-validation sets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ubo_core.config import ValidationConfig
from ubo_core.data import FeedbackData
from ubo_core.datasets.validation import build_validation_sets
from ubo_core.errors import ConfigError, DataError

N_USERS, N_ITEMS = 10, 6
# Rated training pairs of 10 users x 6 items.
POSITIVES = {
    0: [0],
    1: [1, 2, 3],
    2: [0, 3, 4],
    3: [0, 1],
    4: [0, 5],
    5: [0, 1, 2],
    6: [1, 2],
    7: [2, 5],
    8: [4],
    9: [5],
}
NEGATIVES = {0: [3], 1: [4, 5], 8: [0, 1], 9: [2]}
# Popularity n_i (training positives per item):
#   item 0: users 0 2 3 4 5 = 5;  item 1: 1 3 5 6 = 4;  item 2: 1 5 6 7 = 4
#   item 3: 1 2 = 2;              item 4: 2 8 = 2;      item 5: 4 7 9 = 3
# Activity: [1, 3, 3, 2, 2, 3, 2, 2, 1, 1], 20 positives in all, 6 rated negatives.
# active_user_fraction 0.2 -> round(0.2 * 10) = 2 users; users 1, 2 and 5 tie on 3 positives
# -> users 1 and 2 (lower ids).
# User 1: positives 1 (n=4), 2 (n=4), 3 (n=2) -> item 1 (tie with 2, lower id);
#         rated negatives 4 (n=2), 5 (n=3) -> item 5 (more popular though higher id; the
#         unrated item 0, n=5, is not a candidate).
# User 2: positives 0 (n=5), 3, 4 (n=2) -> item 0; no rated negative -> positive only.
EXPECTED_VAL = {"user": [1, 1, 2], "item": [1, 5, 0], "label": [1, 0, 1]}
# Remaining training positives: 20 - 2 = 18; hyper_fraction 0.5 -> 9 positives, 9 unlabeled.
N_HYPER_POS = 9


def make_data() -> FeedbackData:
    pairs = [(u, i, 1) for u, items in POSITIVES.items() for i in items]
    pairs += [(u, i, 0) for u, items in NEGATIVES.items() for i in items]
    pairs.sort()
    user, item, label = (np.array(column) for column in zip(*pairs, strict=True))
    return FeedbackData(
        n_users=N_USERS,
        n_items=N_ITEMS,
        train_user=user.astype(np.int32),
        train_item=item.astype(np.int32),
        train_label=label.astype(np.int8),
        test_user=np.array([0, 0], np.int32),
        test_item=np.array([4, 5], np.int32),
        test_label=np.array([1, 0], np.int8),
        eval_users=np.array([0], np.int32),
    )


CONFIG = ValidationConfig(active_user_fraction=0.2, hyper_fraction=0.5, seed=0)


def keys(user, item) -> set[tuple[int, int]]:
    return set(zip(np.asarray(user).tolist(), np.asarray(item).tolist(), strict=True))


@pytest.fixture(scope="module")
def result() -> FeedbackData:
    return build_validation_sets(make_data(), CONFIG)


def test_input_matches_the_hand_worked_popularity_and_activity():
    data = make_data()
    np.testing.assert_array_equal(data.item_popularity(), [5, 4, 4, 2, 2, 3])
    np.testing.assert_array_equal(data.user_activity(), [1, 3, 3, 2, 2, 3, 2, 2, 1, 1])


def test_unbiased_validation_set_is_the_hand_worked_one(result):
    np.testing.assert_array_equal(result.val_user, EXPECTED_VAL["user"])
    np.testing.assert_array_equal(result.val_item, EXPECTED_VAL["item"])
    np.testing.assert_array_equal(result.val_label, EXPECTED_VAL["label"])
    assert (result.val_user.dtype, result.val_item.dtype, result.val_label.dtype) == (
        np.int32,
        np.int32,
        np.int8,
    )


def test_user_without_rated_negative_gives_only_the_positive(result):
    # user 2 has no rated negative: exactly one validation pair, its positive
    assert result.val_label[result.val_user == 2].tolist() == [1]


def test_validation_and_hyper_pairs_leave_training(result):
    original = make_data()
    rated = keys(original.train_user, original.train_item)
    val = keys(result.val_user, result.val_item)
    hyper = keys(result.hyper_user, result.hyper_item)
    excluded = keys(result.excluded_user, result.excluded_item)
    train = keys(result.train_user, result.train_item)
    assert excluded == val | hyper
    assert len(excluded) == result.excluded_user.size  # no repeats
    assert not (val & hyper)
    assert not (train & excluded)
    assert train == rated - excluded  # nothing else is removed
    # labels of the kept training pairs are the original ones
    original_pairs = zip(original.train_user.tolist(), original.train_item.tolist(), strict=True)
    original_label = dict(zip(original_pairs, original.train_label.tolist(), strict=True))
    kept_pairs = zip(result.train_user.tolist(), result.train_item.tolist(), strict=True)
    kept_labels = [original_label[pair] for pair in kept_pairs]
    np.testing.assert_array_equal(result.train_label, kept_labels)


def test_hyper_set_pairs_positives_with_unlabeled_of_the_same_user(result):
    positives = {(u, i) for u, items in POSITIVES.items() for i in items}
    val = keys(result.val_user, result.val_item)
    assert result.hyper_label.size == 2 * N_HYPER_POS
    assert int(result.hyper_label.sum()) == N_HYPER_POS
    is_pos = result.hyper_label == 1
    hyper_pos = keys(result.hyper_user[is_pos], result.hyper_item[is_pos])
    hyper_neg = keys(result.hyper_user[~is_pos], result.hyper_item[~is_pos])
    assert len(hyper_pos) == len(hyper_neg) == N_HYPER_POS  # distinct pairs
    assert hyper_pos <= positives - val  # held-out training positives, not validation ones
    assert not (hyper_neg & positives)  # unlabeled: never a training positive
    assert not (hyper_neg & val)
    # per user, as many unlabeled items as held-out positives
    pos_users = np.bincount(result.hyper_user[result.hyper_label == 1], minlength=N_USERS)
    neg_users = np.bincount(result.hyper_user[result.hyper_label == 0], minlength=N_USERS)
    np.testing.assert_array_equal(pos_users, neg_users)
    # sorted by (user, item)
    order = np.lexsort((result.hyper_item, result.hyper_user))
    np.testing.assert_array_equal(order, np.arange(order.size))


def test_counts_after_validation(result):
    counts = result.counts()
    # excluded = 3 validation + 18 hyper pairs = 21; dense pairs 10 * 6 - 21 = 39
    expected = {
        "n_val_pairs": 3,
        "n_val_pos": 2,
        "n_val_users": 2,
        "n_hyper_pairs": 18,
        "n_hyper_pos": 9,
        "n_excluded_pairs": 21,
        "n_dense_train_pairs": 39,
    }
    assert {key: counts[key] for key in expected} == expected
    # 9 held-out positives, at most 3 per user (user 5 has the most left: 3) -> 3..9 users
    assert 3 <= counts["n_hyper_users"] <= 9
    # 20 positives - 2 validation - 9 hyper = 9 training positives left
    assert counts["n_train_pos"] == 9
    assert set(counts) == {
        "n_users",
        "n_items",
        "n_train_ratings",
        "n_train_pos",
        "n_test_ratings",
        "n_test_pos",
        "n_eval_users",
        "n_val_pairs",
        "n_val_pos",
        "n_val_users",
        "n_hyper_pairs",
        "n_hyper_pos",
        "n_hyper_users",
        "n_excluded_pairs",
        "n_dense_train_pairs",
    }


def test_same_seed_same_sets_other_seed_other_hyper_set(result):
    again = build_validation_sets(make_data(), CONFIG)
    for field in dataclasses.fields(FeedbackData):
        a, b = getattr(result, field.name), getattr(again, field.name)
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b)
    other = build_validation_sets(make_data(), dataclasses.replace(CONFIG, seed=1))
    # The validation set does not depend on the seed, the hyper set does.
    np.testing.assert_array_equal(other.val_item, result.val_item)
    assert keys(other.hyper_user, other.hyper_item) != keys(result.hyper_user, result.hyper_item)


def test_hyper_fraction_too_small_is_an_error():
    # round(0.02 * 18) = round(0.36) = 0 hyper positives
    config = ValidationConfig(active_user_fraction=0.2, hyper_fraction=0.02, seed=0)
    with pytest.raises(DataError) as info:
        build_validation_sets(make_data(), config)
    assert str(info.value) == "validation: the hyper-validation set would be empty"


def test_no_active_user_is_an_error():
    # round(0.04 * 10) = 0 active users
    config = ValidationConfig(active_user_fraction=0.04, hyper_fraction=0.5, seed=0)
    with pytest.raises(DataError, match="no active user with a training positive"):
        build_validation_sets(make_data(), config)


def test_clicks_only_training_data_needs_unlabeled_negatives():
    """A click log (no rated negative at all) would give a validation set of positives only,
    on which the bi-level objective is constant: `negative: rated` refuses it, naming the fix;
    `negative: unlabeled` works."""
    data = make_data()
    positive = data.train_label == 1
    clicks = dataclasses.replace(
        data,
        train_user=data.train_user[positive],
        train_item=data.train_item[positive],
        train_label=data.train_label[positive],
    )
    with pytest.raises(DataError, match="set validation.negative: unlabeled"):
        build_validation_sets(clicks, CONFIG)
    unlabeled = dataclasses.replace(CONFIG, negative="unlabeled")
    assert set(build_validation_sets(clicks, unlabeled).val_label.tolist()) == {0, 1}


def test_input_with_validation_sets_is_refused(result):
    with pytest.raises(DataError) as info:
        build_validation_sets(result, CONFIG)
    assert str(info.value) == "validation: the input already has validation sets"


def test_every_user_active_hand_worked():
    # fraction 1.0 -> all 10 users are active (each has a training positive here).
    # Most popular positive per user (n = [5, 4, 4, 2, 2, 3]):
    #   u0 {0} -> 0; u1 {1,2,3} -> 1 (4 = 4, lower id); u2 {0,3,4} -> 0; u3 {0,1} -> 0;
    #   u4 {0,5} -> 0; u5 {0,1,2} -> 0; u6 {1,2} -> 1 (tie); u7 {2,5} -> 2 (4 > 3);
    #   u8 {4} -> 4; u9 {5} -> 5.
    config = ValidationConfig(active_user_fraction=1.0, hyper_fraction=0.5, seed=0)
    result = build_validation_sets(make_data(), config)
    positives = result.val_label == 1
    np.testing.assert_array_equal(result.val_user[positives], np.arange(10))
    np.testing.assert_array_equal(result.val_item[positives], [0, 1, 0, 0, 0, 0, 1, 2, 4, 5])
    # rated negatives: u0 {3} -> 3; u1 {4, 5} -> 5; u8 {0, 1} -> 0 (n=5); u9 {2} -> 2
    negatives = ~positives
    np.testing.assert_array_equal(result.val_user[negatives], [0, 1, 8, 9])
    np.testing.assert_array_equal(result.val_item[negatives], [3, 5, 0, 2])


def triples(data: FeedbackData) -> list[tuple[int, int, int]]:
    columns = (data.val_user.tolist(), data.val_item.tolist(), data.val_label.tolist())
    return list(zip(*columns, strict=True))


def test_unlabeled_negative_is_the_most_popular_non_positive_item():
    """`negative: unlabeled`: user 1 (positives 1, 2, 3) takes item 0 (n = 5, never rated by
    user 1) instead of the rated negative 5; user 2 (positives 0, 3, 4) now has a negative:
    item 1 (n = 4, ties with item 2, lower id)."""
    config = dataclasses.replace(CONFIG, negative="unlabeled")
    out = build_validation_sets(make_data(), config)
    assert keys(out.val_user, out.val_item) == {(1, 1), (1, 0), (2, 0), (2, 1)}
    labels = {(u, i): y for u, i, y in triples(out)}
    assert labels == {(1, 1): 1, (1, 0): 0, (2, 0): 1, (2, 1): 0}


def test_popularity_by_ratings_counts_every_rating():
    """`popularity: ratings`: three more rated negatives of item 3 (users 6, 7, 8) give it
    2 + 1 + 3 = 6 ratings against item 1's 5, so user 1's positive becomes item 3; by
    training positives (3: n = 2, 1: n = 4) it stays item 1."""
    data = make_data()
    extra_user, extra_item = np.array([6, 7, 8], np.int32), np.array([3, 3, 3], np.int32)
    data = dataclasses.replace(
        data,
        train_user=np.concatenate([data.train_user, extra_user]),
        train_item=np.concatenate([data.train_item, extra_item]),
        train_label=np.concatenate([data.train_label, np.zeros(3, np.int8)]),
    )
    by_ratings = build_validation_sets(data, dataclasses.replace(CONFIG, popularity="ratings"))
    by_positives = build_validation_sets(data, CONFIG)
    positive = {(u, i) for u, i, y in triples(by_ratings) if y == 1}
    assert (1, 3) in positive and (1, 1) not in positive
    assert (1, 1) in keys(by_positives.val_user, by_positives.val_item)


@pytest.mark.parametrize(("key", "value"), [("negative", "popular"), ("popularity", "clicks")])
def test_unknown_validation_choice_is_an_error(key, value):
    with pytest.raises(ConfigError, match=f"validation.{key}: unknown value"):
        ValidationConfig(**{key: value})
