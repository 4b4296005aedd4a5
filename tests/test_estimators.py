"""The estimators of the paper (ubo_core.estimators) against hand-worked values, closed forms
and Monte-Carlo simulation.

Notation: gamma = P(R = 1) relevance, m = P(O = 1) exposure, R~ = R O ~ Bern(q), q = m gamma;
p = sigmoid(s) the model's relevance, s its logit. With the true m in the estimators:
    L1 (Eq. 4)  = -[(y/m) log p + (1 - y/m) log(1 - p)]
    L2 (Eq. 10) = -[y log(m p) + (1 - y) log(1 - m p)]
    dL1/dp = -(y/m)/p + (1 - y/m)/(1 - p): two values whose gap is 1/(m p (1 - p)), so
        Var_y dL1/dp = q (1 - q) / (m p (1 - p))^2
                     = gamma (1 - m gamma) / (m p^2 (1 - p)^2)                  (Eq. 6)
    dL2/dp = -y/p + (1 - y) m/(1 - m p): gap 1/p + m/(1 - m p) = 1/(p (1 - m p)), so
        Var_y dL2/dp = m gamma (1 - m gamma) / (p^2 (1 - m p)^2)              (Eq. 11)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ubo_core.estimators import (
    bpr_loss,
    ips_loss,
    item_popularity_exposure,
    log_loss,
    low_variance_loss,
)


# The paper's variance formulas, checked here by hand and by Monte Carlo (the pipeline never
# needs them: they are the theory behind choosing L2 over L1).
def ips_gradient_variance(
    gamma: torch.Tensor, exposure: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """Var over R~ ~ Bern(m gamma) of dL1/dp with m_bar = m (Eq. 6):
    gamma (1 - m gamma) / (m p^2 (1 - p)^2); unbounded as m -> 0."""
    return gamma * (1 - exposure * gamma) / (exposure * p**2 * (1 - p) ** 2)


def low_variance_gradient_variance(
    gamma: torch.Tensor, exposure: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """Var over R~ ~ Bern(m gamma) of dL2/dp (Eq. 11):
    m gamma (1 - m gamma) / (p^2 (1 - m p)^2); bounded as m -> 0."""
    return exposure * gamma * (1 - exposure * gamma) / (p**2 * (1 - exposure * p) ** 2)


LOG2 = math.log(2.0)
LOG3 = math.log(3.0)  # sigmoid(log 3) = 3 / (1 + 3) = 0.75


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def logit_of(p: float) -> float:
    return math.log(p / (1.0 - p))


# -- hand-worked values ---------------------------------------------------------------------
def test_ips_loss_hand_values():
    # s = 0 (p = 1/2), m = 1/2, y = 1: weight y/m = 2, -(2 log 1/2 - log 1/2) = log 2.
    # s = log 3 (p = 3/4), m = 1/4, y = 1: weight 4, -(4 log 3/4 - 3 log 1/4)
    #   = -4 log 0.75 + 3 log 0.25 = 1.150728 - 4.158883 = -3.008155 (IPS can go negative).
    # s = log 3, m = 1/4, y = 0: weight 0, -log(1 - 3/4) = log 4 = 1.386294.
    loss = ips_loss(t64(0.0, LOG3, LOG3), t64(0.5, 0.25, 0.25), t64(1.0, 1.0, 0.0))
    expected = t64(LOG2, -4 * math.log(0.75) + 3 * math.log(0.25), math.log(4.0))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert loss[1].item() == pytest.approx(-3.008155, abs=1e-6)


def test_low_variance_loss_hand_values():
    # s = log 3 (p = 3/4), m = 1/2: m p = 3/8.
    #   y = 1: -log(3/8) = 0.980829;  y = 0: -log(1 - 3/8) = -log(5/8) = 0.470004.
    # s = 0 (p = 1/2), m = 1/10, y = 1: -log(0.05) = 2.995732.
    loss = low_variance_loss(t64(LOG3, LOG3, 0.0), t64(0.5, 0.5, 0.1), t64(1.0, 0.0, 1.0))
    expected = t64(-math.log(0.375), -math.log(0.625), -math.log(0.05))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert loss.tolist() == pytest.approx([0.980829, 0.470004, 2.995732], abs=1e-6)


def test_log_loss_and_bpr_loss_hand_values():
    # log loss: (s=0, y=1) -> log 2; (s=log 3, y=0) -> -log(1/4) = log 4;
    #           (s=log 3, y=1) -> -log(3/4) = 0.287682.
    loss = log_loss(t64(0.0, LOG3, LOG3), t64(1.0, 0.0, 1.0))
    torch.testing.assert_close(loss, t64(LOG2, math.log(4.0), -math.log(0.75)), rtol=1e-12, atol=0)
    # BPR: -log sigmoid(s_pos - s_neg): (2, 2) -> log 2; (log 3, 0) -> -log(3/4);
    #      (0, log 3) -> -log(1/4) = log 4 (the negative ranked above the positive costs more).
    bpr = bpr_loss(t64(2.0, LOG3, 0.0), t64(2.0, 0.0, LOG3))
    torch.testing.assert_close(bpr, t64(LOG2, -math.log(0.75), math.log(4.0)), rtol=1e-12, atol=0)


def test_both_estimators_are_the_log_loss_when_exposure_is_one():
    # m = 1: L1 = -[y log p + (1 - y) log(1 - p)] = L2 = binary log loss.
    logits = torch.linspace(-6, 6, 13, dtype=torch.float64)
    ones = torch.ones_like(logits)
    for y in (0.0, 1.0):
        labels = torch.full_like(logits, y)
        reference = log_loss(logits, labels)
        torch.testing.assert_close(ips_loss(logits, ones, labels), reference)
        torch.testing.assert_close(low_variance_loss(logits, ones, labels), reference)


def test_low_variance_loss_stays_finite_for_saturated_logits():
    # sigmoid(40) rounds to 1 in float32 and float64, so 1 - m p would be 0 at m = 1: the
    # estimator floors it; loss and gradient must stay finite.
    for dtype in (torch.float32, torch.float64):
        logits = torch.tensor([40.0, -40.0], dtype=dtype, requires_grad=True)
        loss = low_variance_loss(logits, torch.ones(2, dtype=dtype), torch.zeros(2, dtype=dtype))
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()


def test_item_popularity_exposure_hand_values():
    # theta_i = (n_i / max n) ** 0.5: n = [0, 1, 4] -> [0, (1/4)^0.5, 1] = [0, 0.5, 1].
    theta = item_popularity_exposure(torch.tensor([0, 1, 4]))
    torch.testing.assert_close(theta, t64(0.0, 0.5, 1.0), rtol=0, atol=0)
    # power 1: [0, 1/4, 1]; power 2: [0, 1/16, 1].
    torch.testing.assert_close(
        item_popularity_exposure(torch.tensor([0, 1, 4]), 1.0), t64(0, 0.25, 1)
    )
    torch.testing.assert_close(
        item_popularity_exposure(torch.tensor([0, 1, 4]), 2.0), t64(0, 0.0625, 1)
    )
    with pytest.raises(ValueError):
        item_popularity_exposure(torch.tensor([0, 0, 0]))


# -- the gradient variances (Eq. 6 and Eq. 11) -------------------------------------------------
def test_variance_formulas_by_hand():
    # gamma = m = p = 1/2, q = m gamma = 1/4:
    #   Eq. 6:  gamma (1 - q) / (m p^2 (1-p)^2) = 0.5 * 0.75 / (0.5 * 0.0625) = 0.375 / 0.03125 = 12
    #   Eq. 11: q (1 - q) / (p^2 (1 - m p)^2) = 0.1875 / (0.25 * 0.5625) = 0.1875 / 0.140625 = 4/3
    half = t64(0.5)
    assert ips_gradient_variance(half, half, half).item() == pytest.approx(12.0, rel=1e-12)
    assert low_variance_gradient_variance(half, half, half).item() == pytest.approx(
        4 / 3, rel=1e-12
    )
    # gamma = 0.8, m = 0.1, p = 0.4, q = 0.08:
    #   Eq. 6:  0.8 * 0.92 / (0.1 * 0.16 * 0.36) = 0.736 / 0.00576 = 127.777...
    #   Eq. 11: 0.08 * 0.92 / (0.16 * 0.96^2) = 0.0736 / 0.147456 = 0.499131...
    g, m, p = t64(0.8), t64(0.1), t64(0.4)
    assert ips_gradient_variance(g, m, p).item() == pytest.approx(0.736 / 0.00576, rel=1e-12)
    assert low_variance_gradient_variance(g, m, p).item() == pytest.approx(
        0.0736 / 0.147456, rel=1e-12
    )


# (gamma, m, p): small m where IPS blows up, moderate and full exposure, p off and on gamma.
MC_CASES = [
    (0.3, 0.05, 0.4),
    (0.8, 0.05, 0.6),
    (0.5, 0.2, 0.3),
    (0.6, 0.5, 0.7),
    (0.9, 1.0, 0.5),
]
N_DRAWS = 1_000_000


@pytest.mark.parametrize(("gamma", "m", "p"), MC_CASES)
def test_gradient_variances_match_monte_carlo(gamma, m, p):
    """Draw R~ ~ Bern(m gamma) N times, take dL/dp by autograd through the logit
    (dL/dp = dL/ds / (p (1 - p)) since ds/dp = 1 / (p (1 - p))), and compare the empirical
    variance with Eq. 6 / Eq. 11. dL/dp takes two values (y = 0, 1) with gap c, so the sample
    variance is c^2 q^(1 - q^) and its relative standard error is |1 - 2q| / sqrt(N q (1 - q))
    (delta method); e.g. q = 0.015: 1 / sqrt(1e6 * 0.0148) = 0.8%. Tolerance: 5 standard
    errors (and at least 0.1%), with a fixed seed."""
    q = m * gamma
    gen = torch.Generator().manual_seed(1234)
    labels = (torch.rand(N_DRAWS, generator=gen, dtype=torch.float64) < q).double()
    exposure = torch.full((N_DRAWS,), m, dtype=torch.float64)
    rel_se = abs(1 - 2 * q) / math.sqrt(N_DRAWS * q * (1 - q))
    tolerance = max(5 * rel_se, 1e-3)

    for loss_fn, variance_fn, gap in (
        (ips_loss, ips_gradient_variance, 1 / (m * p * (1 - p))),
        (low_variance_loss, low_variance_gradient_variance, 1 / (p * (1 - m * p))),
    ):
        logit = torch.full((N_DRAWS,), logit_of(p), dtype=torch.float64, requires_grad=True)
        loss_fn(logit, exposure, labels).sum().backward()
        grad_p = logit.grad / (p * (1 - p))
        # The two values of dL/dp are the closed forms of the module docstring.
        values = {float(grad_p[labels == y][0]) for y in (0.0, 1.0)}
        assert max(values) - min(values) == pytest.approx(gap, rel=1e-9)
        empirical = float(grad_p.var())
        closed_form = variance_fn(t64(gamma), t64(m), t64(p)).item()
        assert empirical == pytest.approx(closed_form, rel=tolerance), loss_fn.__name__


def test_ips_variance_grows_like_one_over_m_while_low_variance_stays_bounded():
    """Eq. 6 * m = gamma (1 - m gamma) / (p^2 (1-p)^2) -> gamma / (p^2 (1-p)^2) as m -> 0, so
    Eq. 6 ~ 1/m is unbounded; Eq. 11 <= (1/4) / (p^2 (1-p)^2) for every m in (0, 1] (since
    q (1 - q) <= 1/4 and 1 - m p >= 1 - p) and -> 0 with m; their ratio is
    Eq. 11 / Eq. 6 = m^2 (1 - p)^2 / (1 - m p)^2 <= m^2."""
    gamma, p = t64(0.4), t64(0.3)
    ms = torch.logspace(-6, 0, 25, dtype=torch.float64)
    v1 = ips_gradient_variance(gamma, ms, p)
    v2 = low_variance_gradient_variance(gamma, ms, p)
    limit = gamma / (p**2 * (1 - p) ** 2)
    assert (v1[:-1] > v1[1:]).all()  # decreasing in m: smaller m, larger variance
    torch.testing.assert_close(ms * v1, limit * (1 - ms * gamma), rtol=1e-12, atol=0)
    assert float(v1[0]) > 1e6 * float(limit) * 0.99  # m = 1e-6
    assert (v2 <= 0.25 / (p**2 * (1 - p) ** 2)).all()
    assert float(v2[0]) < 1e-5 * float(limit)
    torch.testing.assert_close(
        v2 / v1, ms**2 * (1 - p) ** 2 / (1 - ms * p) ** 2, rtol=1e-10, atol=0
    )


# -- unbiasedness -----------------------------------------------------------------------------
def expected_loss(loss_fn, logits, exposure, gamma):
    """E over R~ ~ Bern(m gamma) of the per-pair loss: q L(y=1) + (1 - q) L(y=0)."""
    q = exposure * gamma
    ones, zeros = torch.ones_like(logits), torch.zeros_like(logits)
    return q * loss_fn(logits, exposure, ones) + (1 - q) * loss_fn(logits, exposure, zeros)


@pytest.mark.parametrize("loss_fn", [ips_loss, low_variance_loss])
@pytest.mark.parametrize(("gamma", "m"), [(0.3, 0.05), (0.7, 0.2), (0.5, 0.9), (0.12, 1.0)])
def test_expected_loss_is_minimised_at_p_equal_gamma(loss_fn, gamma, m):
    """E[L1] = -[gamma log p + (1 - gamma) log(1 - p)] (E[y/m] = gamma): minimum at p = gamma.
    E[L2] = -[q log(m p) + (1 - q) log(1 - m p)]; d/dp = -q/p + (1 - q) m / (1 - m p) = 0
    <=> q (1 - m p) = (1 - q) m p <=> q = m p <=> p = gamma.
    Checked on a grid of p with spacing 1e-5 and by the gradient at p = gamma being 0."""
    p = torch.arange(1e-5, 1.0, 1e-5, dtype=torch.float64)
    logits = torch.log(p / (1 - p))
    values = expected_loss(loss_fn, logits, torch.full_like(p, m), torch.full_like(p, gamma))
    assert float(p[values.argmin()]) == pytest.approx(gamma, abs=2e-5)

    at_gamma = torch.tensor([logit_of(gamma)], dtype=torch.float64, requires_grad=True)
    expected_loss(loss_fn, at_gamma, t64(m), t64(gamma)).sum().backward()
    assert abs(float(at_gamma.grad)) < 1e-12


@pytest.mark.parametrize("loss_fn", [ips_loss, low_variance_loss])
def test_minimising_the_expected_loss_recovers_gamma(loss_fn):
    """30 users x 20 items, gamma = sigmoid(U V^T) with rank-2 U, V, and a known exposure
    m_ui in [0.05, 1] (item popularity times a user factor). Minimising sum E[L] over free
    logits (one per pair) with L-BFGS gives p = gamma to 1e-3 on every pair."""
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(30, 2)), rng.normal(size=(20, 2))
    gamma = torch.from_numpy(1 / (1 + np.exp(-(users @ items.T))))
    item_pop = np.linspace(0.05, 1.0, 20) ** 1.5
    user_factor = rng.uniform(0.5, 1.0, size=(30, 1))
    exposure = torch.from_numpy(np.clip(item_pop[None, :] * user_factor, 0.05, 1.0))
    assert float(exposure.min()) == pytest.approx(0.05) and float(gamma.min()) < 0.1

    logits = torch.zeros(30, 20, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [logits],
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = expected_loss(loss_fn, logits, exposure, gamma).sum()
        loss.backward()
        return loss

    for _ in range(6):  # L-BFGS restarts; E[L2] is flat in s where m is small
        optimizer.step(closure)
    recovered = torch.sigmoid(logits.detach())
    assert float((recovered - gamma).abs().max()) < 1e-3


def test_low_variance_loss_with_zero_exposure_on_a_negative_is_finite_regression_nan():
    """Regression: UBO in dense mode on Yahoo diverged to NaN. An exposure that underflows to
    exactly 0 on a negative pair made y * log(m p) = 0 * -inf = NaN in the loss and in dL/dm.
    With y = 0 the loss is -log(1 - m p) = -log(1) = 0 and its gradients are finite."""
    logit = torch.tensor([0.3, 0.3], requires_grad=True)
    exposure = torch.tensor([0.0, 0.5], requires_grad=True)
    label = torch.tensor([0.0, 1.0])
    loss = low_variance_loss(logit, exposure, label)
    assert loss[0].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(logit.grad).all() and torch.isfinite(exposure.grad).all()
