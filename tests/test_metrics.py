"""Tests of ubo_core.metrics against hand-worked examples and simple invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ubo_core.metrics import (
    MetricError,
    RankingTask,
    expected_random_dcg,
    exposure_pcc,
    per_user_metrics,
    ranking_metrics,
    snips_metrics,
    snips_per_user_metrics,
)
from ubo_core.metrics import _rank_order as rank_order

LOG2_3 = math.log2(3)


def ranks(scores: np.ndarray, task: RankingTask) -> np.ndarray:
    """(n_users, L) 1-based rank of every candidate within its user's list, 0 at padding: the
    order every metric reads, made visible for the tie-breaking tests."""
    order = rank_order(scores, task)
    out = np.empty(order.shape, dtype=np.int64)
    positions = np.broadcast_to(np.arange(1, order.shape[1] + 1, dtype=np.int64), order.shape)
    np.put_along_axis(out, order, positions, axis=1)
    out[~task.mask] = 0
    return out


def single_user_task(labels: list[int], items: list[int] | None = None, user: int = 0):
    """A task of one user whose candidates are stored in the given order."""
    items = list(range(len(labels))) if items is None else items
    return RankingTask(
        user_ids=np.array([user]),
        item_ids=np.array([items]),
        labels=np.array([labels]),
        mask=np.ones((1, len(labels)), dtype=bool),
    )


def random_task(rng: np.random.Generator, n_users: int = 30, max_len: int = 8) -> RankingTask:
    """Users 0..n_users-1 with 1..max_len candidates each, at least one label of each kind mixed."""
    users, items, labels = [], [], []
    for u in range(n_users):
        length = int(rng.integers(1, max_len + 1))
        users += [u] * length
        items += list(rng.choice(50, size=length, replace=False))
        labels += list(rng.integers(0, 2, size=length))
    return RankingTask.from_pairs(np.array(users), np.array(items), np.array(labels))


# ---------------------------------------------------------------- RankingTask


def test_from_pairs_sorts_users_and_items_and_pads():
    users = np.array([5, 2, 5, 2, 5])
    items = np.array([9, 4, 1, 0, 3])
    labels = np.array([1, 0, 0, 1, 1])
    task = RankingTask.from_pairs(users, items, labels)
    assert task.n_users == 2
    np.testing.assert_array_equal(task.user_ids, [2, 5])
    np.testing.assert_array_equal(task.item_ids, [[0, 4, -1], [1, 3, 9]])
    np.testing.assert_array_equal(task.labels, [[1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(task.mask, [[True, True, False], [True, True, True]])
    assert task.user_ids.dtype == np.int64
    assert task.item_ids.dtype == np.int64
    assert task.labels.dtype == np.int8
    assert task.mask.dtype == np.bool_


def test_from_pairs_keeps_only_eval_users():
    users = np.array([0, 1, 1, 2, 3])
    items = np.array([0, 1, 2, 3, 4])
    labels = np.array([1, 1, 0, 1, 0])
    # User 7 has no pair and so cannot appear; the order of eval_users does not matter.
    task = RankingTask.from_pairs(users, items, labels, eval_users=np.array([3, 1, 7]))
    np.testing.assert_array_equal(task.user_ids, [1, 3])
    np.testing.assert_array_equal(task.item_ids, [[1, 2], [4, -1]])


@pytest.mark.parametrize(
    ("users", "items", "labels", "eval_users", "match"),
    [
        ([0, 1], [0, 1, 2], [1, 0], None, "same length"),
        ([0, 0], [3, 3], [1, 0], None, "duplicate"),
        ([], [], [], None, "no user"),
        ([0, 1], [0, 1], [1, 0], [5], "no user"),
        ([0, 1], [0, 1], [1, 2], None, "0/1"),
        ([0, -1], [0, 1], [1, 0], None, ">= 0"),
    ],
)
def test_from_pairs_rejects_bad_input(users, items, labels, eval_users, match):
    with pytest.raises(MetricError, match=match):
        RankingTask.from_pairs(
            np.array(users, dtype=np.int64),
            np.array(items, dtype=np.int64),
            np.array(labels, dtype=np.int64),
            eval_users=eval_users,
        )


def test_task_validates_direct_construction():
    ok = {
        "user_ids": np.array([0, 1]),
        "item_ids": np.array([[0, 1], [2, -1]]),
        "labels": np.array([[1, 0], [1, 0]]),
        "mask": np.array([[True, True], [True, False]]),
    }
    RankingTask(**ok)
    bad_cases = [
        ({"labels": np.array([[1, 0], [1, 1]])}, "0 at padding"),
        ({"item_ids": np.array([[0, 1], [2, 3]])}, "-1 at padding"),
        ({"item_ids": np.array([[0, 0], [2, -1]])}, "duplicate"),
        ({"user_ids": np.array([1, 1])}, "unique"),
        ({"mask": np.array([[True, True], [False, False]])}, "no candidate"),
        ({"user_ids": np.array([0, 1, 2])}, "shape"),
    ]
    for change, match in bad_cases:
        with pytest.raises(MetricError, match=match):
            RankingTask(**{**ok, **change})


def test_gather_picks_candidate_scores_and_nans_padding():
    task = RankingTask.from_pairs(np.array([0, 2, 2]), np.array([3, 1, 0]), np.array([1, 0, 1]))
    full = np.arange(12, dtype=np.float32).reshape(3, 4)  # full[u, i] = 4u + i
    got = task.gather(full)
    assert got.shape == (2, 2)
    assert got[0, 0] == 3.0  # user 0, item 3
    assert np.isnan(got[0, 1])  # padding
    np.testing.assert_array_equal(got[1], [8.0, 9.0])  # user 2, items 0 and 1
    with pytest.raises(MetricError, match="rows"):
        task.gather(full[:2])
    with pytest.raises(MetricError, match="columns"):
        task.gather(full[:, :3])
    with pytest.raises(MetricError, match="2-D"):
        task.gather(full[0])


# ---------------------------------------------------------------- ranks


def test_ranks_descending_score_and_zero_at_padding():
    task = RankingTask.from_pairs(
        np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]), np.array([0, 1, 0, 1, 0])
    )
    scores = np.array([[0.2, 0.9, 0.5], [0.1, 0.3, np.nan]])
    np.testing.assert_array_equal(ranks(scores, task), [[3, 1, 2], [2, 1, 0]])
    assert ranks(scores, task).dtype == np.int64


def test_ties_are_pessimistic_and_deterministic():
    # Constant scores: negatives first (by item id), then positives (by item id).
    task = single_user_task([1, 0, 1, 0], items=[3, 5, 7, 9])
    np.testing.assert_array_equal(ranks(np.zeros((1, 4)), task), [[3, 1, 4, 2]])
    # Partial tie: item 11 wins outright; among the tied 10(+), 12(-), 13(+): 12, 10, 13.
    task = single_user_task([1, 0, 0, 1], items=[10, 11, 12, 13])
    np.testing.assert_array_equal(ranks(np.array([[0.5, 0.9, 0.5, 0.5]]), task), [[3, 1, 2, 4]])


def test_tie_breaking_does_not_depend_on_storage_order():
    rng = np.random.default_rng(0)
    items = np.array([4, 8, 1, 6, 3, 9])
    labels = np.array([1, 0, 1, 1, 0, 0])
    scores = np.array([1.0, 1.0, 2.0, 1.0, 2.0, 1.0])  # heavy ties
    base = ranks(scores[None], single_user_task(list(labels), list(items)))[0]
    rank_of = dict(zip(items.tolist(), base.tolist(), strict=True))
    for _ in range(10):
        p = rng.permutation(6)
        got = ranks(scores[p][None], single_user_task(list(labels[p]), list(items[p])))[0]
        assert dict(zip(items[p].tolist(), got.tolist(), strict=True)) == rank_of


def test_constant_scorer_gets_worst_metrics():
    # 2 positives among 5: every tie puts them at ranks 4 and 5.
    task = single_user_task([1, 1, 0, 0, 0])
    got = ranking_metrics(np.full((1, 5), 0.3), task, ks=(1, 3, 5))
    assert got["dcg@3"] == 0.0
    assert got["recall@3"] == 0.0
    # DCG@5 = 1/log2(5) + 1/log2(6)
    assert got["dcg@5"] == pytest.approx(1 / math.log2(5) + 1 / math.log2(6))


def test_infinite_scores_are_allowed():
    task = single_user_task([1, 0, 1, 0])
    scores = np.array([[np.inf, np.inf, -np.inf, 0.0]])
    # +inf tie: negative item 1 first, then positive item 0; -inf last.
    np.testing.assert_array_equal(ranks(scores, task), [[2, 1, 4, 3]])


def test_nan_score_names_the_user():
    task = RankingTask.from_pairs(
        np.array([3, 3, 7, 7]), np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0])
    )
    scores = np.array([[0.5, 0.2], [np.nan, 0.1]])
    with pytest.raises(MetricError, match=r"1 user\(s\).*user_ids: 7\)"):
        ranks(scores, task)
    with pytest.raises(MetricError, match="user_ids: 7"):
        ranking_metrics(scores, task)


def test_all_nan_user_is_an_error_not_a_zero():
    task = single_user_task([1, 0], user=42)
    with pytest.raises(MetricError, match=r"1 of them with only NaN.*42"):
        per_user_metrics(np.full((1, 2), np.nan), task)


def test_nan_error_lists_at_most_five_users():
    n = 8
    task = RankingTask.from_pairs(np.arange(n), np.zeros(n, dtype=np.int64), np.ones(n))
    with pytest.raises(MetricError, match=r"8 user\(s\).*user_ids: 0, 1, 2, 3, 4, \.\.\.\)"):
        ranks(np.full((n, 1), np.nan), task)


def test_nan_at_padding_is_ignored():
    task = RankingTask.from_pairs(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([1, 0, 1]))
    scores = task.gather(np.array([[0.1, 0.2], [0.3, 0.4]]))  # nan at user 1's padding
    assert ranking_metrics(scores, task)["dcg@1"] == pytest.approx(0.5)  # (0 + 1) / 2


@pytest.mark.parametrize("shape", [(1, 3), (2, 4), (4,), (2, 3, 1)])
def test_wrong_score_shape_is_an_error(shape):
    task = RankingTask.from_pairs(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([1, 0, 1]))
    with pytest.raises(MetricError, match="shape"):
        ranks(np.zeros(shape), task)
    with pytest.raises(MetricError, match="shape"):
        ranking_metrics(np.zeros(shape), task)


# ---------------------------------------------------------------- plain metrics


def test_hand_worked_single_user():
    # Scores already descending, so the ranks are 1..4 and hits sit at ranks 2 and 3.
    task = single_user_task([0, 1, 1, 0])
    got = per_user_metrics(np.array([[0.9, 0.8, 0.7, 0.1]]), task, ks=(1, 2, 3, 4))
    expected = {
        "dcg@1": 0.0,
        "dcg@2": 1 / LOG2_3,  # hit at rank 2
        "dcg@3": 1 / LOG2_3 + 1 / 2,  # + hit at rank 3: 1/log2(4)
        "dcg@4": 1 / LOG2_3 + 1 / 2,
        "map@1": 0.0,
        "map@2": 0.5,  # (1/1) * precision@2 = 1/2
        "map@3": (1 / 2) * (1 / 2 + 2 / 3),  # precision@2 = 1/2, precision@3 = 2/3
        "map@4": (1 / 2) * (1 / 2 + 2 / 3),
        "recall@1": 0.0,
        "recall@2": 0.5,  # 1 of 2 positives
        "recall@3": 1.0,
        "recall@4": 1.0,
    }
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == (1,)
        assert got[name][0] == pytest.approx(value, abs=1e-15), name


def test_hand_worked_two_users_and_mean():
    # User 0: items 0..2 labels [1, 0, 1], scores [0.1, 0.5, 0.3] -> ranks [3, 1, 2].
    #   hits at ranks 2, 3: DCG@2 = 1/log2 3, MAP@2 = 1/2, recall@2 = 1/2.
    # User 1: items 0, 1 labels [1, 0], scores [0.9, 0.2] -> hit at rank 1.
    #   DCG@2 = 1, MAP@2 = 1, recall@2 = 1.
    # User 2: one negative candidate: every metric 0 (recall 0 since no positive).
    task = RankingTask.from_pairs(
        np.array([0, 0, 0, 1, 1, 2]),
        np.array([0, 1, 2, 0, 1, 4]),
        np.array([1, 0, 1, 1, 0, 0]),
    )
    scores = np.array([[0.1, 0.5, 0.3], [0.9, 0.2, np.nan], [0.7, np.nan, np.nan]])
    per_user = per_user_metrics(scores, task, ks=(2,))
    np.testing.assert_allclose(per_user["dcg@2"], [1 / LOG2_3, 1.0, 0.0])
    np.testing.assert_allclose(per_user["map@2"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(per_user["recall@2"], [0.5, 1.0, 0.0])
    mean = ranking_metrics(scores, task, ks=(2,))
    assert mean["dcg@2"] == pytest.approx((1 / LOG2_3 + 1.0) / 3)
    assert mean["map@2"] == pytest.approx(0.5)
    assert mean["recall@2"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in mean.values())


def test_k_beyond_list_length():
    # Two candidates, positive at rank 2: DCG@10 = DCG@2 = 1/log2 3, MAP@10 = 1/2, recall@10 = 1.
    task = single_user_task([0, 1])
    got = ranking_metrics(np.array([[2.0, 1.0]]), task, ks=(10,))
    assert got == pytest.approx({"dcg@10": 1 / LOG2_3, "map@10": 0.5, "recall@10": 1.0})


def test_default_keys():
    task = single_user_task([1, 0])
    got = ranking_metrics(np.array([[1.0, 0.0]]), task)
    assert set(got) == {f"{m}@{k}" for m in ("dcg", "map", "recall") for k in (1, 2, 3)}


@pytest.mark.parametrize("ks", [(), (0,), (1, -2), (1.5,), (True,)])
def test_bad_cutoffs(ks):
    task = single_user_task([1, 0])
    with pytest.raises(MetricError, match="ks"):
        ranking_metrics(np.array([[1.0, 0.0]]), task, ks=ks)


def test_dcg1_equals_map1_on_random_inputs():
    rng = np.random.default_rng(1)
    for _ in range(5):
        task = random_task(rng)
        scores = rng.integers(0, 3, size=task.item_ids.shape).astype(float)  # ties included
        got = per_user_metrics(scores, task, ks=(1,))
        np.testing.assert_array_equal(got["dcg@1"], got["map@1"])


def test_padding_equals_scoring_each_user_alone():
    rng = np.random.default_rng(2)
    task = random_task(rng, n_users=25, max_len=7)
    scores = rng.normal(size=task.item_ids.shape)
    scores[~task.mask] = np.nan
    scores[0, : task.mask[0].sum()] = 0.0  # one all-tied user
    ks = (1, 2, 3, 5, 10)
    together = per_user_metrics(scores, task, ks=ks)
    for row in range(task.n_users):
        m = task.mask[row]
        alone_task = RankingTask(
            user_ids=task.user_ids[row : row + 1],
            item_ids=task.item_ids[row : row + 1, m],
            labels=task.labels[row : row + 1, m],
            mask=np.ones((1, int(m.sum())), dtype=bool),
        )
        alone = per_user_metrics(scores[row : row + 1, m], alone_task, ks=ks)
        for name, value in alone.items():
            assert together[name][row] == pytest.approx(value[0], abs=1e-15), (row, name)


def test_perfect_ranking_has_full_recall_and_map():
    rng = np.random.default_rng(3)
    task = random_task(rng)
    scores = task.labels.astype(float)  # positives above negatives
    got = per_user_metrics(scores, task, ks=(8,))
    has_pos = task.labels.sum(axis=1) > 0
    np.testing.assert_array_equal(got["recall@8"][has_pos], 1.0)
    np.testing.assert_array_equal(got["map@8"][has_pos], 1.0)


# ---------------------------------------------------------------- SNIPS


def test_snips_equals_plain_with_uniform_propensity():
    rng = np.random.default_rng(4)
    task = random_task(rng)
    scores = rng.normal(size=task.item_ids.shape).round(1)  # some ties
    ks = (1, 2, 3, 5)
    plain = per_user_metrics(scores, task, ks=ks)
    for p in (1.0, 0.37, 1e-3):
        snips = snips_per_user_metrics(scores, task, np.full(scores.shape, p), ks=ks)
        for name, value in plain.items():
            np.testing.assert_array_equal(snips["snips_" + name], value)
    mean = snips_metrics(scores, task, np.full(scores.shape, 0.2), ks=ks)
    assert mean == {"snips_" + k: v for k, v in ranking_metrics(scores, task, ks=ks).items()}


def test_snips_uniform_within_user_differs_between_users():
    # SNIPS normalises per user, so a per-user constant propensity also gives the plain metrics.
    rng = np.random.default_rng(5)
    task = random_task(rng)
    scores = rng.normal(size=task.item_ids.shape)
    prop = np.broadcast_to(rng.uniform(0.1, 1.0, size=(task.n_users, 1)), scores.shape)
    plain = ranking_metrics(scores, task)
    snips = snips_metrics(scores, task, prop)
    for name, value in plain.items():
        assert snips["snips_" + name] == pytest.approx(value, rel=1e-12)


def test_snips_hand_worked():
    # User 0: scores [0.9, 0.8, 0.7, 0.1], labels [0, 1, 1, 0] -> positives at ranks 2 and 3,
    # propensities 0.2 and 0.5 -> weights w = 5 (rank 2) and 2 (rank 3); sum w = 7, n_pos = 2.
    # User 1: labels [1, 0], scores [0.1, 0.9] -> positive at rank 2, weight 1/0.4 = 2.5.
    task = RankingTask.from_pairs(
        np.array([0, 0, 0, 0, 1, 1]),
        np.array([0, 1, 2, 3, 0, 1]),
        np.array([0, 1, 1, 0, 1, 0]),
    )
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.9, np.nan, np.nan]])
    # Propensities of negatives and padding are ignored (even 0 or NaN).
    prop = np.array([[0.0, 0.2, 0.5, np.nan], [0.4, 0.0, np.nan, np.nan]])
    got = snips_per_user_metrics(scores, task, prop, ks=(1, 2, 3))
    expected = {
        "snips_dcg@1": [0.0, 0.0],
        "snips_dcg@2": [2 * (5 / LOG2_3) / 7, 1 * (2.5 / LOG2_3) / 2.5],
        "snips_dcg@3": [2 * (5 / LOG2_3 + 2 / 2) / 7, 1 / LOG2_3],  # rank 3: 1/log2(4) = 1/2
        "snips_recall@1": [0.0, 0.0],
        "snips_recall@2": [5 / 7, 1.0],
        "snips_recall@3": [1.0, 1.0],
        "snips_map@1": [0.0, 0.0],
        "snips_map@2": [5 * (1 / 2) / 5, 2.5 * (1 / 2) / 2.5],  # precision@2 = 1/2
        "snips_map@3": [(5 * (1 / 2) + 2 * (2 / 3)) / 7, 0.5],  # precision@3 = 2/3
    }
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-14, err_msg=name)
    mean = snips_metrics(scores, task, prop, ks=(3,))
    assert mean["snips_map@3"] == pytest.approx(((2.5 + 4 / 3) / 7 + 0.5) / 2)


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf])
def test_snips_rejects_bad_propensity_on_positive(bad):
    task = single_user_task([0, 1], user=9)
    prop = np.array([[0.5, bad]])
    with pytest.raises(MetricError, match="user_ids: 9"):
        snips_metrics(np.array([[1.0, 0.0]]), task, prop)


def test_snips_rejects_wrong_propensity_shape():
    task = single_user_task([0, 1])
    with pytest.raises(MetricError, match="propensity has shape"):
        snips_metrics(np.array([[1.0, 0.0]]), task, np.ones(2))


# ---------------------------------------------------------------- expected random DCG


def test_expected_random_dcg_hand_worked():
    # User 0: 1 positive of 4 -> (1/4) (1 + 1/log2 3 + 1/2) for k = 3.
    # User 1: 2 positives of 2 -> (2/2) (1 + 1/log2 3); only 2 ranks exist.
    task = RankingTask.from_pairs(
        np.array([0, 0, 0, 0, 1, 1]),
        np.array([0, 1, 2, 3, 0, 1]),
        np.array([0, 1, 0, 0, 1, 1]),
    )
    u0 = 0.25 * (1 + 1 / LOG2_3 + 0.5)
    u1 = 1.0 * (1 + 1 / LOG2_3)
    assert expected_random_dcg(task, 3) == pytest.approx((u0 + u1) / 2)
    assert expected_random_dcg(task, 1) == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(MetricError):
        expected_random_dcg(task, 0)


def test_expected_random_dcg_matches_monte_carlo():
    rng = np.random.default_rng(6)
    task = random_task(rng, n_users=12, max_len=6)
    n_draws = 3000
    draws = np.empty(n_draws)
    for t in range(n_draws):
        # Continuous i.i.d. scores have no ties, so each user's ranking is a uniform permutation.
        draws[t] = ranking_metrics(rng.random(task.item_ids.shape), task, ks=(3,))["dcg@3"]
    se = draws.std(ddof=1) / math.sqrt(n_draws)
    assert se > 0
    assert abs(draws.mean() - expected_random_dcg(task, 3)) < 4 * se


# ---------------------------------------------------------------- exposure PCC


def test_exposure_pcc_matches_corrcoef_per_row():
    rng = np.random.default_rng(7)
    m_true = rng.random((20, 15))
    m_hat = 0.5 * m_true + rng.normal(scale=0.3, size=m_true.shape)
    per_row = [np.corrcoef(m_hat[u], m_true[u])[0, 1] for u in range(20)]
    assert exposure_pcc(m_hat, m_true) == pytest.approx(np.mean(per_row), rel=1e-12)
    rows = np.array([3, 0, 11])
    assert exposure_pcc(m_hat, m_true, users=rows) == pytest.approx(
        np.mean([per_row[u] for u in rows]), rel=1e-12
    )
    mask = np.zeros(20, dtype=bool)
    mask[rows] = True
    assert exposure_pcc(m_hat, m_true, users=mask) == pytest.approx(
        np.mean([per_row[u] for u in rows]), rel=1e-12
    )


def test_exposure_pcc_perfect_and_anti_correlation():
    m_true = np.array([[0.1, 0.5, 0.9], [0.3, 0.2, 0.1]])
    assert exposure_pcc(2 * m_true + 1, m_true) == pytest.approx(1.0)
    assert exposure_pcc(-m_true, m_true) == pytest.approx(-1.0)


def test_exposure_pcc_constant_hat_row_contributes_zero():
    # Row 0 correlates perfectly (1), row 1 of m_hat is constant (0 by convention): mean 1/2.
    m_true = np.array([[0.1, 0.5, 0.9], [0.3, 0.2, 0.1]])
    m_hat = np.array([[1.0, 2.0, 3.0], [0.1, 0.1, 0.1]])
    assert exposure_pcc(m_hat, m_true) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("m_hat", "m_true", "users", "match"),
    [
        (np.ones((2, 3)), np.ones((2, 4)), None, "same shape"),
        (np.ones(3), np.ones(3), None, "2-D"),
        (np.eye(3), np.array([[1.0, 2, 3], [4, 4, 4], [1, 0, 0]]), None, r"constant.*rows: 1"),
        (np.array([[np.nan, 1, 2]]), np.array([[1.0, 2, 3]]), None, "m_hat has non-finite"),
        (np.array([[0.0, 1, 2]]), np.array([[1.0, np.nan, 3]]), None, "m_true has non-finite"),
        (np.eye(3), np.eye(3), np.array([3]), "users must index"),
        (np.eye(3), np.eye(3), np.array([], dtype=np.int64), "no row"),
    ],
)
def test_exposure_pcc_errors(m_hat, m_true, users, match):
    with pytest.raises(MetricError, match=match):
        exposure_pcc(m_hat, m_true, users=users)


def test_exposure_pcc_constant_true_row_outside_users_is_fine():
    m_true = np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    assert exposure_pcc(m_true, m_true, users=np.array([0])) == pytest.approx(1.0)
