"""Semi-synthetic data sets with known relevance gamma and exposure m (ML-100K, Amazon CDs,
and your own CSV data without a test file: with a `rating` column it takes ML-100K's route,
without one Amazon's).

Saito et al. 2020's recipe (PAPER.md "Data protocol"), on a popularity subset that trains in
minutes (params.yaml `catalog.<name>`: `n_items`, `min_user_interactions`):
1. Ground truth fitted to the real data. ML-100K: an MF fitted to the star ratings gives r_hat,
   gamma = sigmoid(clip(r_hat, 1, 5) - eps); a logistic MF fitted to the rated/unrated
   indicator gives the exposure score s, m = sigmoid(s) ** power.
   `generator: reference` (default) fits both as Saito et al.'s generator does
   (usaito/unbiased-implicit-rec, src/utils/data_generator.py): no bias terms, Glorot-uniform
   initialisation, `fit_steps` Adam steps on `reference_batch_size` pairs drawn with
   replacement (the ratings for r_hat; all N x M pairs with the rated indicator as label for
   s). 300 x 256 draws are about 0.8 epoch of ML-100K's ratings and 0.05 of its pairs: the
   fits stop early, so s is mostly a user plus an item effect and r_hat a smooth preference.
   `generator: fitted` instead fits biased MFs (b_u + b_i + p_u . q_i) by full-batch Adam
   until they reproduce the rated pattern (`fit_lr`, `fit_weight_decay`).
   Amazon CDs has no star ratings offline (the mirror holds interactions only): a logistic MF
   with user and item biases fitted to the interaction indicator, logit = b_u + b_i +
   p_u . q_i, gives the relevance: its preference part p_u . q_i, free of the popularity and
   activity biases, standardised and mapped to pseudo-ratings r = clip(mean + std * z, 1, 5)
   with ML-100K's rating mean and std, then gamma = sigmoid(r - eps) as for ML-100K. Its
   exposure is m = sigmoid(s) ** power with s from the generator's logistic MF (the
   reference's on the indicator, or the same biased fit's logit).
2. Training clicks: R ~ Bern(gamma), O ~ Bern(m) for every pair; the exposed pairs (O = 1)
   are the "rated" pairs, labelled R, so R~ = O * R.
3. Test: for every user, `n_test_items` items drawn uniformly without replacement, each with a
   fresh relevance draw R ~ Bern(gamma) (random exposure, so no exposure bias), evaluated
   exactly like the real sets.
4. A second test protocol, Saito et al.'s (their src/evaluator.py): per user, the relevant
   but unclicked pairs of the training draw (R = 1, O = 0) against up to
   `unexposed_test_negatives` items drawn without replacement from the items that are some
   user's such positive, minus the user's own relevant items (`unexposed_test_*`). Those
   positives are negatives in training (R~ = 0), so this protocol asks whether a method
   recovers what exposure hid; the first asks how well it ranks a random list.
Fits run in float64 on one CPU thread, and the stage command (`python -m ubo_core.stages`)
runs MKL in its CPU-independent mode (`REPRODUCIBLE_BLAS`): the same seed then gives the same
bytes on x86-64 CPUs with AVX2 or AVX-512 (MKL's promise for the mode; checked on one AVX-512
host under each instruction set MKL and ATen can be held to). In a process whose MKL already
chose its path (a notebook, pytest) the bytes are that CPU type's; ATen without vector kernels
(ATEN_CPU_CAPABILITY=default) and other architectures give their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ubo_core.config import CatalogEntry, SemisyntheticConfig
from ubo_core.data import FeedbackData, evaluable_users
from ubo_core.datasets.readers import Interactions
from ubo_core.errors import DataError

if TYPE_CHECKING:
    from ubo_core.datasets.dataset import Dataset

# ML-100K's rating mean and standard deviation, used to give Amazon's pseudo-ratings the
# same scale (so one eps means comparable relevance levels on both sets).
PSEUDO_RATING_MEAN = 3.53
PSEUDO_RATING_STD = 1.13


def build_semisynthetic(
    dataset: Dataset, raw_folder: Path, config: SemisyntheticConfig
) -> tuple[FeedbackData, dict[str, int]]:
    """The prepare stage's science for a semi-synthetic set: raw folder -> data set with true
    gamma and m. A source with ratings (ML-100K) gets its relevance from an MF fitted to
    them; one without (Amazon CDs) from the preference of a logistic MF of its interactions,
    put on ML-100K's rating scale.

    Also returns the size of the source it was derived from (`source_n_users`,
    `source_n_items`, `source_n_interactions`) for the summary.
    """
    if not raw_folder.is_dir():
        raise DataError(
            raw_folder, f"raw data missing; run `dvc repro download@{dataset.name}` first"
        )
    interactions = dataset.read(raw_folder)
    assert isinstance(interactions, Interactions), dataset
    # Children are keyed by index: a fourth leaves the first three (and their draws) as they were.
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    torch_seed = int(seeds[0].generate_state(1)[0])
    reference = config.generator == "reference"
    source = _source_counts(interactions.user, interactions.item)
    user, item, kept = _popular_subset(
        interactions.user, interactions.item, dataset.entry, dataset.name
    )
    shape = (int(user.max()) + 1, int(item.max()) + 1)
    if interactions.rating is not None:
        rating = interactions.rating[kept].astype(np.float64)
        with _deterministic_torch(torch_seed):
            if reference:
                r_hat = fit_reference_mf(user, item, rating, shape, config, "squared")
                exposure_logit = fit_reference_mf(user, item, None, shape, config, "logistic")
            else:
                r_hat = fit_rating_mf(user, item, rating, shape, config)
                exposure_logit, _ = fit_logistic_mf(user, item, shape, config)
        relevance = _sigmoid(np.clip(r_hat, 1.0, 5.0) - config.relevance_eps)
    else:
        with _deterministic_torch(torch_seed):
            exposure_logit, preference = fit_logistic_mf(user, item, shape, config)
            if reference:
                exposure_logit = fit_reference_mf(user, item, None, shape, config, "logistic")
        z = (preference - preference.mean()) / preference.std()
        pseudo_rating = np.clip(PSEUDO_RATING_MEAN + PSEUDO_RATING_STD * z, 1.0, 5.0)
        relevance = _sigmoid(pseudo_rating - config.relevance_eps)
    exposure = _sigmoid(exposure_logit) ** config.exposure_power
    data = sample_feedback(
        relevance,
        exposure,
        config.n_test_items,
        seeds[1],
        seeds[2],
        unexposed_negatives=config.unexposed_test_negatives,
        unexposed_seed=seeds[3],
    )
    data.check(raw_folder)
    return data, source


def _source_counts(user: np.ndarray, item: np.ndarray) -> dict[str, int]:
    return {
        "source_n_users": int(np.unique(user).size),
        "source_n_items": int(np.unique(item).size),
        "source_n_interactions": int(user.size),
    }


def sample_feedback(
    relevance: np.ndarray,
    exposure: np.ndarray,
    n_test_items: int,
    train_seed: np.random.SeedSequence,
    test_seed: np.random.SeedSequence,
    unexposed_negatives: int | None = None,
    unexposed_seed: np.random.SeedSequence | None = None,
) -> FeedbackData:
    """Draw training clicks R~ = O * R and a random-exposure test set from gamma and m; with
    `unexposed_negatives`, also the relevant-but-unexposed test lists (module docstring, 4)."""
    n_users, n_items = relevance.shape
    if n_test_items > n_items:
        raise DataError("semisynthetic", f"n_test_items {n_test_items} > {n_items} items")
    train_rng, test_rng = np.random.default_rng(train_seed), np.random.default_rng(test_seed)
    relevant = train_rng.random(relevance.shape) < relevance
    exposed = train_rng.random(exposure.shape) < exposure
    train_user, train_item = np.nonzero(exposed)
    train_label = relevant[train_user, train_item].astype(np.int8)
    # Uniform items per user without replacement: the first n of a random permutation.
    test_items = np.argsort(test_rng.random((n_users, n_items)), axis=1)[:, :n_test_items]
    test_items = np.sort(test_items, axis=1)
    test_user = np.repeat(np.arange(n_users), n_test_items)
    test_item = test_items.ravel()
    test_label = (test_rng.random(test_item.size) < relevance[test_user, test_item]).astype(np.int8)
    unexposed: dict[str, np.ndarray] = {}
    if unexposed_negatives is not None:
        assert unexposed_seed is not None
        unexposed = unexposed_test_lists(
            relevant, exposed, unexposed_negatives, np.random.default_rng(unexposed_seed)
        )
    return FeedbackData(
        n_users=n_users,
        n_items=n_items,
        train_user=train_user.astype(np.int32),
        train_item=train_item.astype(np.int32),
        train_label=train_label,
        test_user=test_user.astype(np.int32),
        test_item=test_item.astype(np.int32),
        test_label=test_label,
        eval_users=evaluable_users(n_users, train_user[train_label == 1], test_user, test_label),
        true_relevance=relevance.astype(np.float32),
        true_exposure=exposure.astype(np.float32),
        **unexposed,
    )


def unexposed_test_lists(
    relevant: np.ndarray, exposed: np.ndarray, n_negatives: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Saito et al.'s test lists from the training draw (N x M booleans R and O): per user
    with at least one relevant unexposed item, those items (label 1) and up to `n_negatives`
    of the other users' such items that are not relevant to this user (label 0), drawn
    without replacement. As `FeedbackData`'s `unexposed_test_*` arrays, users ascending."""
    positive = relevant & ~exposed
    candidates = np.flatnonzero(positive.any(axis=0))
    users, items, labels = [], [], []
    for user in np.flatnonzero(positive.any(axis=1)):
        pos = np.flatnonzero(positive[user])
        pool = candidates[~relevant[user, candidates]]
        neg = np.sort(rng.permutation(pool)[:n_negatives])
        both = np.concatenate([pos, neg])
        order = np.argsort(both, kind="stable")
        users.append(np.full(both.size, user, dtype=np.int32))
        items.append(both[order].astype(np.int32))
        labels.append(np.r_[np.ones(pos.size, np.int8), np.zeros(neg.size, np.int8)][order])
    if not users:
        raise DataError("semisynthetic", "no relevant unexposed pair: the second test is empty")
    return {
        "unexposed_test_user": np.concatenate(users),
        "unexposed_test_item": np.concatenate(items),
        "unexposed_test_label": np.concatenate(labels),
    }


def _popular_subset(
    user: np.ndarray, item: np.ndarray, subset: CatalogEntry, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the `n_items` most popular items (ties: lower id; 0 = all), then users with at
    least `min_user_interactions` on them; re-index both densely. Returns (user, item, kept
    rows)."""
    counts = np.bincount(item)
    top_items = np.lexsort((np.arange(counts.size), -counts))[: subset.n_items or None]
    rows = np.flatnonzero(np.isin(item, top_items))
    user_counts = np.bincount(user[rows], minlength=int(user.max()) + 1)
    rows = rows[user_counts[user[rows]] >= subset.min_user_interactions]
    if rows.size == 0:
        raise DataError(
            f"params.yaml catalog.{name}",
            f"n_items {subset.n_items} and min_user_interactions "
            f"{subset.min_user_interactions} keep no interaction",
        )
    kept_users, new_user = np.unique(user[rows], return_inverse=True)
    kept_items, new_item = np.unique(item[rows], return_inverse=True)
    if kept_users.size < 2 or kept_items.size < 2:
        raise DataError(
            f"params.yaml catalog.{name}",
            f"the kept part has {kept_users.size} users and {kept_items.size} items; "
            "at least 2 of each are needed",
        )
    return new_user.astype(np.int64), new_item.astype(np.int64), rows


def fit_rating_mf(
    user: np.ndarray,
    item: np.ndarray,
    rating: np.ndarray,
    shape: tuple[int, int],
    config: SemisyntheticConfig,
) -> np.ndarray:
    """Biased MF r_hat = mu + b_u + b_i + p_u . q_i fitted by full-batch Adam to the observed
    ratings (mean squared error + L2); returns the full (n_users, n_items) r_hat."""
    n_users, n_items = shape
    u, i = torch.from_numpy(user), torch.from_numpy(item)
    target = torch.from_numpy(rating)
    params = _init_factors(n_users, n_items, config.fit_dim)
    mu = torch.tensor(float(rating.mean()), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([mu, *params], lr=config.fit_lr)
    b_u, b_i, p, q = params
    for _ in range(config.fit_steps):
        optimizer.zero_grad()
        prediction = mu + b_u[u] + b_i[i] + (p[u] * q[i]).sum(1)
        loss = ((prediction - target) ** 2).mean() + config.fit_weight_decay * _l2(params)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        full = mu + b_u[:, None] + b_i[None, :] + p @ q.T
    return full.numpy()


def fit_logistic_mf(
    user: np.ndarray, item: np.ndarray, shape: tuple[int, int], config: SemisyntheticConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Logistic MF logit = b_u + b_i + p_u . q_i fitted by full-batch Adam to the N x M 0/1
    indicator of the given pairs (mean log loss + L2). Returns (logit, p . q), both (N, M)."""
    n_users, n_items = shape
    indicator = torch.zeros(shape, dtype=torch.float64)
    indicator[torch.from_numpy(user), torch.from_numpy(item)] = 1.0
    params = _init_factors(n_users, n_items, config.fit_dim)
    b_u, b_i, p, q = params
    with torch.no_grad():
        # Start the item biases at the marginal log-odds: the fit then only learns deviations.
        density = indicator.mean().clamp(1e-6, 1 - 1e-6)
        b_i += torch.log(density / (1 - density))
    optimizer = torch.optim.Adam(params, lr=config.fit_lr)
    for _ in range(config.fit_steps):
        optimizer.zero_grad()
        logit = b_u[:, None] + b_i[None, :] + p @ q.T
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, indicator)
        loss = loss + config.fit_weight_decay * _l2(params)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        preference = p @ q.T
        logit = b_u[:, None] + b_i[None, :] + preference
    return logit.numpy(), preference.numpy()


def fit_reference_mf(
    user: np.ndarray,
    item: np.ndarray,
    rating: np.ndarray | None,
    shape: tuple[int, int],
    config: SemisyntheticConfig,
    loss: str,
) -> np.ndarray:
    """Saito et al.'s ground-truth MF: scores u_emb . i_emb (no biases; both tables Glorot
    uniform, U(-a, a) with a = sqrt(6 / (rows + dim))), `fit_steps` Adam steps at
    `reference_lr`, each on `reference_batch_size` examples drawn uniformly with replacement.
    loss "squared": the examples are the rated pairs with their ratings (mean squared error);
    "logistic": all N x M pairs with label 1 on the given pairs (mean log loss), `rating`
    None. Returns the full (n_users, n_items) scores."""
    n_users, n_items = shape
    generator = torch.Generator().manual_seed(int(torch.initial_seed()))
    tables = []
    for rows in shape:
        bound = (6.0 / (rows + config.fit_dim)) ** 0.5
        uniform = torch.rand(rows, config.fit_dim, generator=generator, dtype=torch.float64)
        tables.append(((2.0 * uniform - 1.0) * bound).requires_grad_())
    user_emb, item_emb = tables
    if loss == "squared":
        assert rating is not None
        users, items = torch.from_numpy(user), torch.from_numpy(item)
        targets = torch.from_numpy(rating)
    else:
        indicator = torch.zeros(shape, dtype=torch.float64)
        indicator[torch.from_numpy(user), torch.from_numpy(item)] = 1.0
    optimizer = torch.optim.Adam(tables, lr=config.reference_lr)
    size = config.reference_batch_size
    for _ in range(config.fit_steps):
        if loss == "squared":
            pick = torch.randint(users.numel(), (size,), generator=generator)
            u, i, y = users[pick], items[pick], targets[pick]
        else:
            u = torch.randint(n_users, (size,), generator=generator)
            i = torch.randint(n_items, (size,), generator=generator)
            y = indicator[u, i]
        score = (user_emb[u] * item_emb[i]).sum(1)
        if loss == "squared":
            value = ((score - y) ** 2).mean()
        else:
            value = torch.nn.functional.binary_cross_entropy_with_logits(score, y)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        return (user_emb @ item_emb.T).numpy()


def _init_factors(n_users: int, n_items: int, dim: int) -> list[torch.Tensor]:
    scale = 0.1
    return [
        torch.zeros(n_users, dtype=torch.float64, requires_grad=True),
        torch.zeros(n_items, dtype=torch.float64, requires_grad=True),
        (scale * torch.randn(n_users, dim, dtype=torch.float64)).requires_grad_(),
        (scale * torch.randn(n_items, dim, dtype=torch.float64)).requires_grad_(),
    ]


def _l2(params: list[torch.Tensor]) -> torch.Tensor:
    return sum((x**2).mean() for x in params)  # type: ignore[return-value]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seed torch and use one thread: float reductions then do not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
