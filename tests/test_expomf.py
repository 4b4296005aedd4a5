"""ubo_core.methods.expomf: ExpoMF's EM (Liang et al. 2016) on tiny data built in memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ubo_core.config import Params, TrainConfig, ValidationConfig
from ubo_core.data import FeedbackData, evaluable_users
from ubo_core.datasets.validation import build_validation_sets
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.errors import ConfigError
from ubo_core.methods import METHODS, resolve_config
from ubo_core.methods.expomf import (
    ExpoMF,
    ExpoMFHyper,
    exposure_posterior,
    log_gaussian,
    ridge_solve,
)
from ubo_core.metrics import expected_random_dcg
from ubo_core.trainer import FullSampler, fit

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, "expomf", ExpoMF)


def random_data(n_users: int, n_items: int, seed: int, exposed: float = 0.4) -> FeedbackData:
    """Rated pairs: each pair exposed with probability `exposed`, positive with probability
    0.3 when exposed; a random test pair per user; then the validation stage."""
    rng = np.random.default_rng(seed)
    rated = rng.random((n_users, n_items)) < exposed
    label = rng.random((n_users, n_items)) < 0.3
    user, item = np.nonzero(rated)
    test_item = rng.integers(0, n_items, n_users)
    data = FeedbackData(
        n_users=n_users,
        n_items=n_items,
        train_user=user.astype(np.int32),
        train_item=item.astype(np.int32),
        train_label=label[user, item].astype(np.int8),
        test_user=np.arange(n_users, dtype=np.int32),
        test_item=test_item.astype(np.int32),
        test_label=(np.arange(n_users) % 2).astype(np.int8),
        eval_users=np.array([1], np.int32),
    )
    return build_validation_sets(data, ValidationConfig(0.2, 0.1, seed))


def make_method(data: FeedbackData, dim: int, seed: int = 0, **hyper) -> ExpoMF:
    tensors = TrainingTensors(data, CPU)
    train = TrainConfig(dim=dim, device="cpu")
    return ExpoMF(tensors, train, ExpoMFHyper(**hyper), torch.Generator().manual_seed(seed))


def full_batch(method: ExpoMF) -> Batch:
    return next(FullSampler(method.tensors).epoch())


# -- 1. EM never decreases the MAP objective ---------------------------------------------------
@pytest.mark.parametrize("constant", ["correct", "reference"])
@pytest.mark.parametrize("init_mu", [0.01, 0.3])
def test_log_posterior_never_decreases_over_em_iterations(init_mu, constant):
    method = make_method(
        random_data(60, 40, seed=0), dim=5, init_mu=init_mu, density_constant=constant
    )
    batch = full_batch(method)
    values = [float(method.log_posterior(batch.users, batch.labels, batch.weight))]
    for _ in range(15):
        loss = method.step(batch)["train_loss"]
        values.append(float(method.log_posterior(batch.users, batch.labels, batch.weight)))
        # train_loss is the negative log posterior per training pair, after the update.
        assert float(loss) == pytest.approx(-values[-1] / float(batch.weight.sum()), rel=1e-6)
    for before, after in zip(values, values[1:], strict=False):
        assert after - before >= -1e-6 * abs(after), values
    assert values[-1] > values[0] + 1.0  # and EM does move


# -- 2. The Gaussian constant ------------------------------------------------------------------
@pytest.mark.parametrize("precision", [0.25, 1.0, 4.0])
def test_gaussian_density_constant_regression_dawenl_expo_mf_issue_4(precision):
    """dawenl/expo-mf issue #4: the exposure posterior's density used sqrt(lam / 2 * pi) =
    sqrt(lam pi / 2) instead of sqrt(lam / (2 pi)). Ours is a normalised density."""
    mean = torch.tensor(0.7, dtype=torch.float64)
    peak = float(log_gaussian(mean, mean, precision))
    assert peak == pytest.approx(0.5 * math.log(precision / (2 * math.pi)), abs=1e-12)
    assert peak != pytest.approx(0.5 * math.log(precision / 2 * math.pi), abs=1e-3)
    grid = torch.linspace(-40.0, 40.0, 400_001, dtype=torch.float64)
    integral = torch.trapezoid(torch.exp(log_gaussian(grid, mean, precision)), grid)
    assert float(integral) == pytest.approx(1.0, abs=1e-9)


# -- 3. E-step closed form ---------------------------------------------------------------------
def test_e_step_matches_a_hand_worked_example():
    # One user, two unclicked items, lambda_y = 1:
    #   item 0: theta.beta = 0, mu = 0.5: N(0 | 0, 1) = 1 / sqrt(2 pi) = 0.3989423
    #     p = 0.5 * 0.3989423 / (0.5 * 0.3989423 + 0.5) = 0.3989423 / 1.3989423 = 0.2851742
    #   item 1: theta.beta = 2, mu = 0.2: N(0 | 2, 1) = 0.3989423 * e^-2 = 0.0539910
    #     p = 0.2 * 0.0539910 / (0.2 * 0.0539910 + 0.8) = 0.0107982 / 0.8107982 = 0.0133180
    # (With the buggy constant sqrt(pi / 2) = 1.2533141, item 0 would get 0.5562.)
    scores = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    mu = torch.tensor([0.5, 0.2], dtype=torch.float64)
    p = exposure_posterior(scores, torch.zeros(1, 2, dtype=torch.float64), mu, 1.0)
    np.testing.assert_allclose(p.numpy(), [[0.2851742, 0.0133180]], atol=1e-7)
    # A click means exposure: p = 1 whatever the score.
    clicked = exposure_posterior(scores, torch.ones(1, 2, dtype=torch.float64), mu, 1.0)
    np.testing.assert_array_equal(clicked.numpy(), [[1.0, 1.0]])
    # Log space: a score far from 0 underflows the density but not the posterior's log-odds.
    far = exposure_posterior(torch.tensor([[60.0]]), torch.zeros(1, 1), mu[:1].float(), 1.0)
    assert float(far) == 0.0 and not torch.isnan(far).any()


def test_reference_constant_is_the_density_times_pi():
    """`density_constant: reference` (dawenl/expo-mf): item 0 above with N(0 | 0, 1) pi =
    sqrt(pi / 2) = 1.2533141, p = 0.5 * 1.2533141 / (0.5 * 1.2533141 + 0.5) = 0.5562092 > mu:
    the zeros can raise mu, which the correct constant forbids for lambda_y < 2 pi."""
    method = make_method(random_data(30, 20, seed=0), dim=2, density_constant="reference")
    offset = method.hyper.density_offset
    scores = torch.tensor([[0.0]], dtype=torch.float64)
    mu = torch.tensor([0.5], dtype=torch.float64)
    p = exposure_posterior(scores, torch.zeros(1, 1, dtype=torch.float64), mu, 1.0, offset)
    np.testing.assert_allclose(p.numpy(), [[0.5562092]], atol=1e-7)
    for lambda_y in (0.5, 2.0, 6.0):  # below 2 pi: never above mu with the correct constant
        low = exposure_posterior(scores, torch.zeros(1, 1, dtype=torch.float64), mu, lambda_y)
        assert float(low) < 0.5


def test_rank_by_exposed_multiplies_by_mu():
    """`rank_by: exposed` ranks by mu_i theta_u . beta_i (the reference's notebook)."""
    data = random_data(20, 10, seed=6)
    plain, exposed = make_method(data, 3), make_method(data, 3, rank_by="exposed")
    for method in (plain, exposed):
        method.step(full_batch(method))
    users = torch.arange(20)
    torch.testing.assert_close(exposed.scores(users), plain.mu * plain.scores(users))


# -- 4. M-step: weighted ridge regressions -----------------------------------------------------
def test_ridge_solve_matches_least_squares():
    rng = np.random.default_rng(1)
    confidence = rng.random((3, 5))
    confidence[0, 1] = 0.0  # a held-out pair
    targets = (rng.random((3, 5)) < 0.5).astype(float)
    factors = rng.normal(size=(5, 2))
    lambda_y, lambda_reg = 2.0, 0.3
    got = ridge_solve(
        torch.from_numpy(confidence), torch.from_numpy(targets), torch.from_numpy(factors),
        lambda_y, lambda_reg,
    ).numpy()  # fmt: skip
    for row in range(3):
        # min_x lambda_y sum_c w_c (t_c - x . f_c)^2 + lambda_reg |x|^2 as one least squares.
        scale = np.sqrt(lambda_y * confidence[row])[:, None]
        design = np.vstack([scale * factors, np.sqrt(lambda_reg) * np.eye(2)])
        target = np.concatenate([scale[:, 0] * targets[row], np.zeros(2)])
        expected, *_ = np.linalg.lstsq(design, target, rcond=None)
        np.testing.assert_allclose(got[row], expected, rtol=1e-10, atol=1e-12)


def test_step_applies_the_m_step_formulas_with_the_e_step_posterior():
    method = make_method(random_data(12, 7, seed=2), dim=3, lambda_theta=0.1, lambda_beta=0.2)
    hyper = method.hyper
    batch = full_batch(method)
    y = batch.labels.double().numpy()
    w = batch.weight.double().numpy()
    p = (method.posterior(batch.users, batch.labels) * batch.weight).double().numpy()
    beta_old = method.beta.double().numpy()
    method.step(batch)
    theta, beta = method.theta.double().numpy(), method.beta.double().numpy()

    def ridge(weights, targets, factors, lam):
        d = factors.shape[1]
        system = hyper.lambda_y * (factors.T * weights) @ factors + lam * np.eye(d)
        return np.linalg.solve(system, hyper.lambda_y * factors.T @ (weights * targets))

    for u in range(12):  # theta_u with the old beta (3)
        np.testing.assert_allclose(theta[u], ridge(p[u], y[u], beta_old, 0.1), rtol=1e-4)
    for i in range(7):  # beta_i with the new theta (4)
        np.testing.assert_allclose(beta[i], ridge(p[:, i], y[:, i], theta, 0.2), rtol=1e-4)
    mu = (hyper.alpha1 + p.sum(0) - 1) / (hyper.alpha1 + hyper.alpha2 + w.sum(0) - 2)  # (5)
    np.testing.assert_allclose(method.mu.numpy(), mu, rtol=1e-5)


# -- 5. Held-out pairs take no part -----------------------------------------------------------
def test_held_out_labels_do_not_change_the_update():
    data = random_data(30, 20, seed=3)
    plain, flipped = make_method(data, dim=4), make_method(data, dim=4)
    batch = full_batch(plain)
    held_out = batch.weight == 0
    assert held_out.any()
    labels = torch.where(held_out, 1.0 - batch.labels, batch.labels)
    out_plain = plain.step(batch)
    out_flipped = flipped.step(Batch(batch.users, None, labels, batch.weight))
    for name in ("theta", "beta", "mu"):
        assert torch.equal(getattr(plain, name), getattr(flipped, name)), name
    assert torch.equal(out_plain["train_loss"], out_flipped["train_loss"])


# -- 6. Through the trainer on planted structure ------------------------------------------------
def planted_data(seed: int = 0, n_users: int = 40, n_items: int = 30) -> FeedbackData:
    """Two user groups (u % 2) each liking one item group (i % 2). Training: each pair exposed
    with probability 0.5, clicked when exposed and liked (10% label noise). Test: 6 random
    other items per user, relevant iff the groups match (random exposure)."""
    rng = np.random.default_rng(seed)
    likes = (np.arange(n_users)[:, None] % 2) == (np.arange(n_items)[None, :] % 2)
    test_items = np.stack([rng.choice(n_items, 6, replace=False) for _ in range(n_users)])
    in_test = np.zeros((n_users, n_items), bool)
    in_test[np.arange(n_users)[:, None], test_items] = True
    rated = (rng.random((n_users, n_items)) < 0.5) & ~in_test
    noisy = likes ^ (rng.random((n_users, n_items)) < 0.1)
    user, item = np.nonzero(rated)
    test_user = np.repeat(np.arange(n_users), 6)
    test_item = test_items.ravel()
    test_label = likes[test_user, test_item].astype(np.int8)
    train_label = noisy[user, item].astype(np.int8)
    data = FeedbackData(
        n_users=n_users,
        n_items=n_items,
        train_user=user.astype(np.int32),
        train_item=item.astype(np.int32),
        train_label=train_label,
        test_user=test_user.astype(np.int32),
        test_item=test_item.astype(np.int32),
        test_label=test_label,
        eval_users=evaluable_users(n_users, user[train_label == 1], test_user, test_label),
    )
    return build_validation_sets(data, ValidationConfig(0.2, 0.1, seed))


TRAIN = TrainConfig(epochs=10, dim=4, device="cpu")


def all_scores(method) -> np.ndarray:
    return method.scores(torch.arange(method.tensors.n_users)).numpy()


@pytest.mark.parametrize("seed", range(5))
def test_trainer_ranks_planted_structure_above_random(seed):
    data = planted_data()
    result = fit("expomf", data, TRAIN, ExpoMFHyper(), seed=seed, progress=False)
    random_dcg = expected_random_dcg(TrainingTensors(data, CPU).test_task, 3)
    # Random ~1.02, perfect ~2.1. Over fit seeds 0-4 x data seeds 0-4 the gap was 0.45-0.71.
    assert result.test_metrics["dcg@3"] > random_dcg + 0.3
    assert len(result.history) == TRAIN.epochs
    assert all(np.isfinite(r.losses["train_loss"]) for r in result.history)


def test_trainer_is_deterministic_in_the_seed():
    data = planted_data()
    runs = [fit("expomf", data, TRAIN, ExpoMFHyper(), seed=s, progress=False) for s in (0, 0, 1)]
    first, again, other = (all_scores(run.method) for run in runs)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


# -- The interface -----------------------------------------------------------------------------
def test_exposure_is_one_on_positives_mu_on_held_out_and_posterior_elsewhere():
    method = make_method(random_data(30, 20, seed=4), dim=4)
    batch = full_batch(method)
    for _ in range(3):
        method.step(batch)
    users = torch.arange(30)
    exposure = method.exposure(users)
    t = method.tensors
    positive, held_out = t.labels > 0, ~t.in_train
    assert torch.all(exposure[positive] == 1.0)
    mu = method.mu.expand(30, -1)
    assert torch.equal(exposure[held_out], mu[held_out])
    other = ~positive & t.in_train
    assert torch.all((exposure[other] > 0) & (exposure[other] < 1))
    assert torch.equal(exposure[other], method.posterior(users, t.labels)[other])


def test_state_round_trips_through_load_state():
    data = random_data(20, 10, seed=5)
    trained, fresh = make_method(data, dim=3, seed=0), make_method(data, dim=3, seed=1)
    trained.step(full_batch(trained))
    fresh.load_state(trained.state())
    users = torch.arange(20)
    assert torch.equal(fresh.scores(users), trained.scores(users))
    assert torch.equal(fresh.exposure(users), trained.exposure(users))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lambda_y", 0.0),
        ("lambda_theta", -1.0),
        ("lambda_beta", float("nan")),
        ("init_mu", 1.0),
        ("init_mu", 0.0),
        ("alpha1", 0.5),
        ("alpha2", "1"),
        ("density_constant", "dawenl"),
        ("rank_by", "popularity"),
    ],
)
def test_bad_hyperparameters_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        ExpoMFHyper(**{key: value})


def test_resolve_config_builds_the_hyperparameters():
    _, hyper = resolve_config(Params(), "yahoo", "expomf", {"lambda_y": 2, "init_mu": 0.05})
    assert hyper == ExpoMFHyper(lambda_y=2.0, init_mu=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    data = random_data(60, 40, seed=6)
    cpu = make_method(data, dim=5)
    tensors = TrainingTensors(data, torch.device("cuda"))
    gpu = ExpoMF(tensors, TrainConfig(dim=5), ExpoMFHyper(), torch.Generator("cuda"))
    gpu.load_state(cpu.state())
    for method in (cpu, gpu):
        for _ in range(3):
            method.step(full_batch(method))
    for name in ("theta", "beta", "mu"):
        np.testing.assert_allclose(
            getattr(gpu, name).cpu().numpy(), getattr(cpu, name).numpy(), rtol=1e-3, atol=1e-4
        )
