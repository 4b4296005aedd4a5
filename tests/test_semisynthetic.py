"""ubo_core.datasets.semisynthetic: clicks drawn from known gamma and m, and the builder."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ubo_core.config import CatalogEntry, SemisyntheticConfig
from ubo_core.data import FeedbackData
from ubo_core.datasets import semisynthetic
from ubo_core.datasets.registry import BUILTINS, SEMISYNTHETIC, Dataset
from ubo_core.datasets.semisynthetic import build_semisynthetic, sample_feedback
from ubo_core.errors import DataError


def seeds(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    train, test = np.random.SeedSequence(seed).spawn(2)
    return train, test


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- sample_feedback

# 4 users x 5 items. Row 1 is never exposed (m = 0); column 2 is never relevant (gamma = 0);
# cells with gamma = 1 and m = 1 are always exposed and positive.
GAMMA = np.array(
    [
        [1.0, 1.0, 0.0, 0.5, 0.5],
        [1.0, 0.5, 0.0, 0.5, 1.0],
        [0.2, 1.0, 0.0, 1.0, 0.7],
        [1.0, 1.0, 0.0, 1.0, 1.0],
    ]
)
EXPOSURE = np.array(
    [
        [1.0, 1.0, 1.0, 0.5, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.3, 1.0, 1.0, 1.0, 0.9],
        [1.0, 0.0, 1.0, 0.5, 1.0],
    ]
)
SURE_POSITIVE = {(0, 0), (0, 1), (2, 1), (2, 3), (3, 0), (3, 4)}  # gamma = m = 1


@pytest.mark.parametrize("seed", range(10))
def test_sample_feedback_respects_zero_and_one_probabilities(seed):
    data = sample_feedback(GAMMA, EXPOSURE, 3, *seeds(seed))
    pairs = zip(data.train_user.tolist(), data.train_item.tolist(), strict=True)
    train = dict(zip(pairs, data.train_label.tolist(), strict=True))
    assert 1 not in data.train_user  # m = 0 on the whole row
    assert all(EXPOSURE[u, i] > 0 for u, i in train)  # only pairs with m > 0 are exposed
    assert all(train[pair] == 0 for pair in train if pair[1] == 2)  # gamma = 0: never positive
    assert all(train.get(pair) == 1 for pair in SURE_POSITIVE)  # always exposed and positive
    # test labels: gamma = 0 never positive, gamma = 1 always positive
    test_gamma = GAMMA[data.test_user, data.test_item]
    assert (data.test_label[test_gamma == 0.0] == 0).all()
    assert (data.test_label[test_gamma == 1.0] == 1).all()


def test_sample_feedback_test_items_are_distinct_per_user():
    n_test = 3
    data = sample_feedback(GAMMA, EXPOSURE, n_test, *seeds(0))
    np.testing.assert_array_equal(data.test_user, np.repeat(np.arange(4), n_test))
    items = data.test_item.reshape(4, n_test)
    assert (np.diff(items, axis=1) > 0).all()  # sorted and distinct within each user
    assert items.min() >= 0 and items.max() < 5


def test_sample_feedback_stores_truth_as_float32_and_is_seeded():
    data = sample_feedback(GAMMA, EXPOSURE, 2, *seeds(3))
    assert data.true_relevance.dtype == np.float32 and data.true_exposure.dtype == np.float32
    np.testing.assert_array_equal(data.true_relevance, GAMMA.astype(np.float32))
    np.testing.assert_array_equal(data.true_exposure, EXPOSURE.astype(np.float32))
    assert data.is_semisynthetic
    again = sample_feedback(GAMMA, EXPOSURE, 2, *seeds(3))
    for name in ("train_user", "train_item", "train_label", "test_item", "test_label"):
        np.testing.assert_array_equal(getattr(data, name), getattr(again, name))


def test_sample_feedback_counts_match_expectations_monte_carlo():
    rng = np.random.default_rng(12345)
    gamma = rng.uniform(0.0, 1.0, (200, 50))
    m = rng.uniform(0.0, 1.0, (200, 50))
    data = sample_feedback(gamma, m, 10, *seeds(7))
    # exposed pairs: a sum of independent Bernoulli(m_ui): mean sum(m), var sum(m (1 - m))
    mean, sd = m.sum(), math.sqrt((m * (1 - m)).sum())
    assert abs(data.train_user.size - mean) < 4 * sd
    # training positives R~ = O R: Bernoulli(gamma m)
    p = gamma * m
    assert abs(int(data.train_label.sum()) - p.sum()) < 4 * math.sqrt((p * (1 - p)).sum())
    # test positives: Bernoulli(gamma) on the 200 * 10 drawn test pairs
    q = gamma[data.test_user, data.test_item]
    assert abs(int(data.test_label.sum()) - q.sum()) < 4 * math.sqrt((q * (1 - q)).sum())
    # test items uniform: each item is drawn by Binomial(200, 10/50) users,
    # mean 40, sd sqrt(200 * 0.2 * 0.8) = 5.657
    per_item = np.bincount(data.test_item, minlength=50)
    assert per_item.sum() == 2000
    assert (np.abs(per_item - 40) < 4.5 * math.sqrt(200 * 0.2 * 0.8)).all()


def test_sample_feedback_too_many_test_items():
    with pytest.raises(DataError) as info:
        sample_feedback(GAMMA, EXPOSURE, 6, *seeds(0))
    assert str(info.value) == "semisynthetic: n_test_items 6 > 5 items"


# ---------------------------------------------------------------- build_semisynthetic

# u.data rows (user, item): item 1 by users 1-8 (8 ratings), item 2 by users 1-6 (6),
# item 3 by users 1 2 3 7 (4), item 4 by users 4 5 6 8 (4), item 5 by user 8 (1).
# n_items=3, min_user_interactions=2 (SUBSET): items 1, 2, 3 (item 3 beats item 4 on the
# 4 = 4 tie by lower id); interactions on them: users 1-3 three, users 4-7 two, user 8 one
# -> user 8 dropped: 7 users x 3 items.
ML_ROWS = (
    [(u, 1) for u in range(1, 9)]
    + [(u, 2) for u in range(1, 7)]
    + [(u, 3) for u in (1, 2, 3, 7)]
    + [(u, 4) for u in (4, 5, 6, 8)]
    + [(8, 5)]
)
EPS = 2.0
CONFIG = SemisyntheticConfig(
    seed=0,
    n_test_items=2,
    relevance_eps=EPS,
    fit_dim=2,
    fit_steps=20,
)
# Both sources keep their 3 most popular items and the users with >= 2 interactions on them.
SUBSET = CatalogEntry(n_items=3, min_user_interactions=2)
ML100K = Dataset("ml100k", SEMISYNTHETIC, "ML-100K", SUBSET, None, BUILTINS["ml100k"].read)
AMAZON = Dataset("amazon_cds", SEMISYNTHETIC, "Amazon", SUBSET, None, BUILTINS["amazon_cds"].read)


@pytest.fixture(scope="module")
def ml100k_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ml100k")
    lines = [
        f"{u}\t{i}\t{1 + (u * 7 + i * 3) % 5}\t{880000000 + k}\n"
        for k, (u, i) in enumerate(ML_ROWS)
    ]
    (folder / "u.data").write_text("".join(lines))
    return folder


@pytest.fixture(scope="module")
def ml100k_built(ml100k_folder) -> tuple[FeedbackData, dict[str, int]]:
    return build_semisynthetic(ML100K, ml100k_folder, CONFIG)


@pytest.fixture(scope="module")
def ml100k_data(ml100k_built) -> FeedbackData:
    return ml100k_built[0]


def test_build_ml100k_reports_the_source_size(ml100k_built):
    # the whole u.data: users 1-8, items 1-5, 8 + 6 + 4 + 4 + 1 = 23 ratings
    assert ml100k_built[1] == {
        "source_n_users": 8,
        "source_n_items": 5,
        "source_n_interactions": 23,
    }


def test_build_ml100k_shapes(ml100k_data):
    data = ml100k_data
    assert (data.n_users, data.n_items) == (7, 3)
    assert data.true_relevance.shape == data.true_exposure.shape == (7, 3)
    # n_test_items = 2 per user
    np.testing.assert_array_equal(data.test_user, np.repeat(np.arange(7), 2))
    assert data.train_user.size == data.train_item.size == data.train_label.size <= 21


def test_build_ml100k_relevance_within_the_closed_form_range(ml100k_data):
    # gamma = sigmoid(clip(r_hat, 1, 5) - eps) lies in [sigmoid(1 - eps), sigmoid(5 - eps)]
    # eps = 2: [sigmoid(-1), sigmoid(3)] = [0.268941, 0.952574]
    low, high = sigmoid(1 - EPS), sigmoid(5 - EPS)
    gamma = ml100k_data.true_relevance
    assert gamma.min() >= low - 1e-6 and gamma.max() <= high + 1e-6
    m = ml100k_data.true_exposure
    assert m.min() > 0.0 and m.max() < 1.0  # sigmoid of a finite logit, power 1


def test_build_ml100k_counts_report_the_truth_means(ml100k_data):
    counts = ml100k_data.counts()
    assert counts["mean_true_exposure"] == round(float(ml100k_data.true_exposure.mean()), 6)
    assert counts["mean_true_relevance"] == round(float(ml100k_data.true_relevance.mean()), 6)
    assert 0 < counts["mean_true_exposure"] < 1
    assert counts["n_users"] == 7 and counts["n_items"] == 3 and counts["n_test_ratings"] == 14


def test_build_ml100k_is_deterministic(ml100k_folder, ml100k_data):
    again, _ = build_semisynthetic(ML100K, ml100k_folder, CONFIG)
    for field in dataclasses.fields(FeedbackData):
        np.testing.assert_array_equal(getattr(again, field.name), getattr(ml100k_data, field.name))


def test_build_ml100k_exposure_power_raises_m_to_that_power(ml100k_folder, ml100k_data):
    # Same seed, same fits: m(power 2) = sigmoid(s) ** 2 = m(power 1) ** 2 (float32 rounding)
    squared, _ = build_semisynthetic(
        ML100K, ml100k_folder, dataclasses.replace(CONFIG, exposure_power=2.0)
    )
    np.testing.assert_allclose(
        squared.true_exposure, ml100k_data.true_exposure.astype(np.float64) ** 2, rtol=1e-6
    )
    np.testing.assert_array_equal(squared.true_relevance, ml100k_data.true_relevance)


def test_build_amazon_cds_from_interactions(tmp_path):
    folder = tmp_path / "amazon_cds"
    folder.mkdir()
    # same popularity pattern with string ids: items "A" (8) "B" (6) "C" (4) "D" (4) "E" (1);
    # "C" < "D" by name, so the kept items are A, B, C; user "u8" has one of them -> dropped.
    names = {1: "A", 2: "B", 3: "C", 4: "D", 5: "E"}
    rows = "".join(f"u{u}\t{names[i]}\n" for u, i in ML_ROWS)
    (folder / "cds_interactions.tsv").write_text("user\titem\n" + rows)
    data, source = build_semisynthetic(AMAZON, folder, CONFIG)
    assert (data.n_users, data.n_items) == (7, 3)
    assert source == {"source_n_users": 8, "source_n_items": 5, "source_n_interactions": 23}
    # pseudo-ratings are clipped to [1, 5], so the same closed-form range as ML-100K
    gamma = data.true_relevance
    assert gamma.min() >= sigmoid(1 - EPS) - 1e-6 and gamma.max() <= sigmoid(5 - EPS) + 1e-6


def test_build_semisynthetic_missing_folder(tmp_path):
    folder = tmp_path / "raw" / "ml100k"
    with pytest.raises(DataError) as info:
        build_semisynthetic(ML100K, folder, CONFIG)
    assert str(info.value) == f"{folder}: raw data missing; run `dvc repro download@ml100k` first"


def test_build_semisynthetic_subset_that_keeps_no_interaction(ml100k_folder):
    # min_user_interactions 4 > 3, the most any user has on the 3 kept items
    dataset = dataclasses.replace(ML100K, entry=CatalogEntry(n_items=3, min_user_interactions=4))
    with pytest.raises(DataError) as info:
        build_semisynthetic(dataset, ml100k_folder, CONFIG)
    assert str(info.value) == (
        "params.yaml catalog.ml100k: n_items 3 and min_user_interactions 4 keep no interaction"
    )


def _fixed_fits(monkeypatch, calls: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replace the MF fits by known (7, 3) matrices and record what they were given."""
    r_hat = np.linspace(-1.0, 7.0, 21).reshape(7, 3)  # spans below 1 and above 5
    logit = np.linspace(-3.0, 3.0, 21).reshape(7, 3)
    preference = np.linspace(-0.5, 0.5, 21)
    preference[[0, -1]] = -10.0, 10.0  # two outliers: |z| > 3, so both clips are reached
    preference = preference.reshape(7, 3)

    def rating_mf(user, item, rating, shape, config):
        calls["rating"] = (user, item, rating, shape)
        return r_hat

    def logistic_mf(user, item, shape, config):
        calls["logistic"] = (user, item, shape)
        return logit, preference

    monkeypatch.setattr(semisynthetic, "fit_rating_mf", rating_mf)
    monkeypatch.setattr(semisynthetic, "fit_logistic_mf", logistic_mf)
    return r_hat, logit, preference


def test_build_ml100k_truth_is_the_closed_form_of_the_fits(ml100k_folder, monkeypatch):
    calls: dict = {}
    r_hat, logit, _ = _fixed_fits(monkeypatch, calls)
    config = dataclasses.replace(CONFIG, exposure_power=1.5, generator="fitted")
    data, _ = build_semisynthetic(ML100K, ml100k_folder, config)
    # gamma = sigmoid(clip(r_hat, 1, 5) - eps); m = sigmoid(logit) ** power
    expected_gamma = 1 / (1 + np.exp(-(np.clip(r_hat, 1, 5) - EPS)))
    expected_m = (1 / (1 + np.exp(-logit))) ** 1.5
    np.testing.assert_array_equal(data.true_relevance, expected_gamma.astype(np.float32))
    np.testing.assert_array_equal(data.true_exposure, expected_m.astype(np.float32))
    assert data.true_relevance.min() == np.float32(sigmoid(1 - EPS))  # clipped from below
    assert data.true_relevance.max() == np.float32(sigmoid(5 - EPS))  # clipped from above
    # Both fits see the subset: 7 users x 3 items, 7 + 6 + 4 = 17 ratings (user 8 and items
    # 4, 5 gone), ids re-indexed densely (user u -> u - 1, item i -> i - 1 here).
    user, item, rating, shape = calls["rating"]
    assert shape == calls["logistic"][2] == (7, 3)
    assert user.size == item.size == rating.size == 17
    np.testing.assert_array_equal(calls["logistic"][0], user)
    expected_pairs = {(u - 1, i - 1) for u, i in ML_ROWS if i <= 3 and u != 8}
    assert set(zip(user.tolist(), item.tolist(), strict=True)) == expected_pairs
    # the ratings go with their pairs: rating of (u, i) was 1 + (7u + 3i) mod 5
    expected_rating = 1 + ((user + 1) * 7 + (item + 1) * 3) % 5
    np.testing.assert_array_equal(rating, expected_rating)
    assert rating.dtype == np.float64


def test_build_amazon_truth_is_the_closed_form_of_the_fit(tmp_path, monkeypatch):
    calls: dict = {}
    _, logit, preference = _fixed_fits(monkeypatch, calls)
    folder = tmp_path / "amazon_cds"
    folder.mkdir()
    names = {1: "A", 2: "B", 3: "C", 4: "D", 5: "E"}
    rows = "".join(f"u{u}\t{names[i]}\n" for u, i in ML_ROWS)
    (folder / "cds_interactions.tsv").write_text("user\titem\n" + rows)
    data, _ = build_semisynthetic(AMAZON, folder, dataclasses.replace(CONFIG, generator="fitted"))
    # z = standardised p.q; r = clip(3.53 + 1.13 z, 1, 5); gamma = sigmoid(r - eps)
    z = (preference - preference.mean()) / preference.std()
    pseudo = np.clip(3.53 + 1.13 * z, 1.0, 5.0)
    assert pseudo.min() == 1.0 and pseudo.max() == 5.0
    expected_gamma = 1 / (1 + np.exp(-(pseudo - EPS)))
    np.testing.assert_allclose(data.true_relevance, expected_gamma.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(
        data.true_exposure, (1 / (1 + np.exp(-logit))).astype(np.float32), rtol=1e-6
    )
    assert "rating" not in calls  # no star ratings on Amazon: the rating MF is not fitted


def _fixed_reference_fits(monkeypatch, calls: dict) -> tuple[np.ndarray, np.ndarray]:
    """Replace the reference generator's fits by known (7, 3) score matrices."""
    r_hat = np.linspace(-1.0, 7.0, 21).reshape(7, 3)
    logit = np.linspace(-3.0, 3.0, 21).reshape(7, 3)

    def reference_mf(user, item, rating, shape, config, loss):
        calls[loss] = (user, item, rating, shape)
        return r_hat if loss == "squared" else logit

    monkeypatch.setattr(semisynthetic, "fit_reference_mf", reference_mf)
    return r_hat, logit


def test_reference_generator_truth_is_the_closed_form_of_its_fits(ml100k_folder, monkeypatch):
    """generator: reference (the default): gamma from the squared-loss MF on the ratings,
    m = sigmoid(s) ** power from the logistic MF on the rated indicator (no ratings given)."""
    calls: dict = {}
    r_hat, logit = _fixed_reference_fits(monkeypatch, calls)
    assert CONFIG.generator == "reference"
    data, _ = build_semisynthetic(
        ML100K, ml100k_folder, dataclasses.replace(CONFIG, exposure_power=2.0)
    )
    gamma = 1 / (1 + np.exp(-(np.clip(r_hat, 1, 5) - EPS)))
    np.testing.assert_array_equal(data.true_relevance, gamma.astype(np.float32))
    np.testing.assert_array_equal(
        data.true_exposure, ((1 / (1 + np.exp(-logit))) ** 2).astype(np.float32)
    )
    user, item, rating, shape = calls["squared"]
    assert shape == (7, 3) and rating.size == 17
    assert calls["logistic"][2] is None
    np.testing.assert_array_equal(calls["logistic"][0], user)


def test_reference_generator_on_amazon_takes_exposure_from_the_reference_fit(tmp_path, monkeypatch):
    """Amazon (no ratings): relevance from the biased fit's preference part as before, the
    exposure from the reference's logistic MF on the interaction indicator."""
    calls: dict = {}
    _, preference_logit, preference = _fixed_fits(monkeypatch, calls)
    _, logit = _fixed_reference_fits(monkeypatch, calls)
    folder = tmp_path / "amazon_cds"
    folder.mkdir()
    rows = "".join(f"u{u}\t{'ABCDE'[i - 1]}\n" for u, i in ML_ROWS)
    (folder / "cds_interactions.tsv").write_text("user\titem\n" + rows)
    data, _ = build_semisynthetic(AMAZON, folder, CONFIG)
    np.testing.assert_allclose(
        data.true_exposure, (1 / (1 + np.exp(-logit))).astype(np.float32), rtol=1e-6
    )
    z = (preference - preference.mean()) / preference.std()
    gamma = 1 / (1 + np.exp(-(np.clip(3.53 + 1.13 * z, 1.0, 5.0) - EPS)))
    np.testing.assert_allclose(data.true_relevance, gamma.astype(np.float32), rtol=1e-6)
    assert "squared" not in calls


def test_reference_fits_learn_what_they_are_given():
    """The squared-loss fit moves towards the ratings and the logistic fit ranks the given
    pairs above the others, from Glorot-uniform starts near 0; same seed, same scores."""
    rng = np.random.default_rng(0)
    shape = (30, 12)
    user = np.repeat(np.arange(30), 4)
    item = (user % 3) * 4 + np.tile(np.arange(4), 30)  # three blocks of users x items
    rating = 1.0 + 4.0 * (item < 4) + rng.normal(0, 0.1, user.size)
    config = dataclasses.replace(
        CONFIG, fit_dim=4, fit_steps=400, reference_lr=0.05, reference_batch_size=64
    )
    torch.manual_seed(0)
    r_hat = semisynthetic.fit_reference_mf(user, item, rating, shape, config, "squared")
    start = np.mean(rating**2)  # the loss at scores 0
    assert np.mean((r_hat[user, item] - rating) ** 2) < 0.2 * start
    torch.manual_seed(0)
    s = semisynthetic.fit_reference_mf(user, item, None, shape, config, "logistic")
    rated = np.zeros(shape, bool)
    rated[user, item] = True
    assert s[rated].mean() > s[~rated].mean() + 1.0
    torch.manual_seed(0)
    again = semisynthetic.fit_reference_mf(user, item, None, shape, config, "logistic")
    np.testing.assert_array_equal(s, again)


# ---------------------------------------------------------------- the unexposed test protocol


def test_unexposed_test_lists_hand_worked():
    """3 users x 5 items. Positives (R = 1, O = 0): user 0 items 1, 3; user 1 none; user 2
    item 4. Candidate negatives: the items that are someone's positive, {1, 3, 4}, minus the
    user's relevant items: user 0 (relevant 0, 1, 3) keeps {4}; user 2 (relevant 2, 4) keeps
    {1, 3}, of which n_negatives = 1 is drawn."""
    relevant = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 1]], dtype=bool)
    exposed = np.array([[1, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=bool)
    lists = semisynthetic.unexposed_test_lists(relevant, exposed, 1, np.random.default_rng(0))
    assert lists["unexposed_test_user"].tolist() == [0, 0, 0, 2, 2]
    assert lists["unexposed_test_item"][:3].tolist() == [1, 3, 4]
    assert lists["unexposed_test_label"].tolist() == [1, 1, 0, *lists["unexposed_test_label"][3:]]
    user2 = dict(
        zip(
            lists["unexposed_test_item"][3:].tolist(),
            lists["unexposed_test_label"][3:].tolist(),
            strict=True,
        )
    )
    assert user2[4] == 1 and len(user2) == 2 and set(user2) - {4} <= {1, 3}
    assert sorted(user2.values()) == [0, 1]
    # With more negatives than the pool, all of it: user 2 gets both 1 and 3.
    lists = semisynthetic.unexposed_test_lists(relevant, exposed, 100, np.random.default_rng(0))
    assert lists["unexposed_test_item"][3:].tolist() == [1, 3, 4]
    assert lists["unexposed_test_label"][3:].tolist() == [0, 0, 1]


def test_unexposed_test_lists_need_a_relevant_unexposed_pair():
    relevant = np.array([[1, 0], [0, 1]], dtype=bool)
    with pytest.raises(DataError, match="no relevant unexposed pair"):
        semisynthetic.unexposed_test_lists(relevant, relevant, 5, np.random.default_rng(0))


def test_sample_feedback_adds_the_unexposed_lists_from_the_training_draw():
    train_seed, test_seed = seeds(4)
    plain = sample_feedback(GAMMA, EXPOSURE, 3, train_seed, test_seed)
    both = sample_feedback(
        GAMMA,
        EXPOSURE,
        3,
        train_seed,
        test_seed,
        unexposed_negatives=2,
        unexposed_seed=np.random.SeedSequence(9),
    )
    # The first protocol's draws do not move.
    for name in ("train_user", "train_item", "train_label", "test_item", "test_label"):
        np.testing.assert_array_equal(getattr(both, name), getattr(plain, name))
    assert plain.unexposed_test_user is None
    user, item, label = (
        both.unexposed_test_user,
        both.unexposed_test_item,
        both.unexposed_test_label,
    )
    exposed = set(zip(both.train_user.tolist(), both.train_item.tolist(), strict=True))
    for u, i, y in zip(user.tolist(), item.tolist(), label.tolist(), strict=True):
        if y == 1:  # relevant and unexposed: never a training pair, gamma > 0
            assert (u, i) not in exposed and GAMMA[u, i] > 0
        else:  # a sampled negative is never relevant where gamma = 1
            assert GAMMA[u, i] < 1
    # Row 1 is never exposed: its gamma = 1 cells (items 0 and 4) are always positives.
    assert {0, 4} <= set(item[(user == 1) & (label == 1)].tolist())
    assert both.counts()["n_unexposed_test_pos"] == int(label.sum())


def test_unexposed_lists_belong_to_semisynthetic_data_and_come_whole(ml100k_data):
    assert ml100k_data.unexposed_test_user is not None
    ml100k_data.check("x")
    partial = dataclasses.replace(ml100k_data, unexposed_test_label=None)
    with pytest.raises(DataError, match="incomplete unexposed test set"):
        partial.check("x")
    real = dataclasses.replace(ml100k_data, true_exposure=None, true_relevance=None)
    with pytest.raises(DataError, match="semi-synthetic data only"):
        real.check("x")
