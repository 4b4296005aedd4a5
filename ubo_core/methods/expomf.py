"""ExpoMF (Liang, Charlin, McInerney and Blei 2016, "Modeling User Exposure in
Recommendation", WWW), fitted by EM: one `step` is one EM iteration.

Model (the paper's Sec. 3, per-item exposure prior), with y_ui = R~_ui in {0, 1}:
    theta_u ~ N(0, lambda_theta^-1 I),   beta_i ~ N(0, lambda_beta^-1 I),
    mu_i ~ Beta(alpha1, alpha2),          a_ui ~ Bernoulli(mu_i)            (exposure)
    y_ui | a_ui = 1 ~ N(theta_u . beta_i, lambda_y^-1),   y_ui | a_ui = 0 = 0.
a is marginalised out, so the MAP objective (`log_posterior`) over the training pairs D is
    (1) L = sum_{(u,i) in D} log( mu_i N(y_ui | theta_u . beta_i, 1/lambda_y)
                                   + (1 - mu_i) 1[y_ui = 0] )
            + sum_u log N(theta_u | 0, I/lambda_theta) + sum_i log N(beta_i | 0, I/lambda_beta)
            + sum_i log Beta(mu_i | alpha1, alpha2).

EM on (1), as in the paper's inference section (equation numbers here are this module's):
    (2) E-step: p_ui = E[a_ui | y, theta, beta, mu] = 1 if y_ui = 1, else
            p_ui = mu_i N(0 | theta_u . beta_i, 1/lambda_y)
                   / (mu_i N(0 | theta_u . beta_i, 1/lambda_y) + 1 - mu_i),
        with N(0 | m, 1/lam) = sqrt(lam / (2 pi)) exp(-lam m^2 / 2), evaluated as
        p = sigmoid(log mu_i + log N(0 | m, 1/lam) - log(1 - mu_i)) (log space: the density
        underflows for large |m|).
    (3) M-step, users (exact weighted ridge regression, an ALS half-step):
            theta_u = (lambda_y sum_i p_ui beta_i beta_i^T + lambda_theta I)^-1
                      (lambda_y sum_i p_ui y_ui beta_i)
    (4) M-step, items, likewise with the new theta:
            beta_i = (lambda_y sum_u p_ui theta_u theta_u^T + lambda_beta I)^-1
                     (lambda_y sum_u p_ui y_ui theta_u)
    (5) M-step, exposure prior: mu_i = (alpha1 + sum_u p_ui - 1) / (alpha1 + alpha2 + N_i - 2),
        N_i = number of training pairs of item i.
The sums run over training pairs only: held-out validation pairs (weight 0) take no part.
One E-step is followed by the three conditional maximisations (3)-(5) of the same expected
complete-data log posterior, so each iteration is an ECM step (Meng and Rubin 1993) and never
decreases (1). (dawenl/expo-mf instead refreshes p before each of (3)-(5); that is monotone
too.) alpha1, alpha2 >= 1 keeps (5) the maximiser inside [0, 1].

The Gaussian constant: dawenl/expo-mf computes sqrt(lam_y / 2 * pi), i.e. sqrt(lam_y pi / 2),
instead of sqrt(lam_y / (2 pi)) (its issue #4): a factor of pi that silently rescales mu_i
into the odds of (2). `log_gaussian` uses the correct constant; tests/test_expomf.py guards it.
`density_constant: reference` reproduces the reference's (a factor pi on the density in (1)
and (2)): with the correct constant and lambda_y < 2 pi the density at 0 stays below 1, so
p_ui < mu_i on every zero and (5) shrinks mu towards the click rate; the reference's factor
moves that bound to lambda_y < 2 / pi (docs/FIDELITY.md measures both).

Ranking (`rank_by`) uses theta_u . beta_i by default, the mean of y_ui given exposure, not
mu_i theta_u . beta_i: the random-exposure test set asks which exposed items a user prefers,
and multiplying by mu_i would rank by how likely an item is to be exposed (popularity) as
much as by preference. `rank_by: exposed` ranks by mu_i theta_u . beta_i, as the reference's
evaluation notebook does.

Cost: (3) needs sum_i p_ui beta_i beta_i^T for every user; it is one GEMM of the (users, items)
weights against the items' outer products beta_i beta_i^T (M, d*d), in chunks of users so
that (N, M, d, d) is never built. The d x d systems are
accumulated and solved (Cholesky) in float64: lambda_theta = 1e-5 leaves them ill conditioned
where p is small, and on CPU and data-centre GPUs the float64 GEMM is cheap at these sizes.
Parameters keep the data's dtype (float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ubo_core.config import TrainConfig, check_choice
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.errors import ConfigError, UboError
from ubo_core.methods.base import Method

SOLVE_DTYPE = torch.float64
# Elements of the largest float64 work array of the chunked GEMMs (2**22 = 32 MiB).
CHUNK_ELEMENTS = 1 << 22


# log of the factor on the Gaussian density: 0, or log pi as dawenl/expo-mf has it.
DENSITY_OFFSETS = {"correct": 0.0, "reference": math.log(math.pi)}
RANKINGS = ("preference", "exposed")


@dataclass(frozen=True)
class ExpoMFHyper:
    lambda_y: float = 1.0  # precision of y given exposure
    lambda_theta: float = 1e-5  # prior precision of the user factors
    lambda_beta: float = 1e-5  # prior precision of the item factors
    init_mu: float = 0.01  # initial mu_i (sparser data: smaller; the paper tunes it)
    alpha1: float = 1.0  # Beta(alpha1, alpha2) prior on mu_i; 1, 1 = uniform
    alpha2: float = 1.0
    # "correct": N(y | m, 1/lambda_y) normalised; "reference": times pi, as dawenl/expo-mf
    # computes it (its issue #4). The module docstring says what it changes.
    density_constant: str = "correct"
    # "preference": theta_u . beta_i; "exposed": mu_i theta_u . beta_i (the reference's
    # notebook). The module docstring says why the default ranks by preference.
    rank_by: str = "preference"

    def __post_init__(self) -> None:
        for key in ("lambda_y", "lambda_theta", "lambda_beta"):
            _check(key, getattr(self, key), lambda v: 0.0 < v <= 1e9, "(0, 1e9]")
        _check("init_mu", self.init_mu, lambda v: 0.0 < v < 1.0, "(0, 1)")
        for key in ("alpha1", "alpha2"):
            # Below 1 the Beta prior's mode is at the boundary and (5) is no maximiser.
            _check(key, getattr(self, key), lambda v: 1.0 <= v <= 1e9, "[1, 1e9]")
        check_choice("density_constant", self.density_constant, DENSITY_OFFSETS)
        check_choice("rank_by", self.rank_by, RANKINGS)

    @property
    def density_offset(self) -> float:
        return DENSITY_OFFSETS[self.density_constant]


def _check(key: str, value: object, ok: Callable[[float], bool], bounds: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if not math.isfinite(value) or not ok(float(value)):
        raise ConfigError(key, f"{value!r} is out of range {bounds}")


# -- the model's pieces, pure functions of tensors ---------------------------------------------
def log_gaussian(y: Tensor | float, mean: Tensor, precision: float) -> Tensor:
    """log N(y | mean, 1/precision) = 0.5 log(precision / (2 pi)) - precision (y - mean)^2 / 2."""
    return 0.5 * math.log(precision / (2.0 * math.pi)) - 0.5 * precision * (y - mean) ** 2


def exposure_posterior(
    scores: Tensor, labels: Tensor, mu: Tensor, lambda_y: float, offset: float = 0.0
) -> Tensor:
    """E-step (2): E[a_ui | y_ui, theta, beta, mu], (B, M) from scores theta_u . beta_i (B, M),
    labels y (B, M) and mu (M,). 1 where y = 1. `offset`: log of a factor on the density
    (ExpoMFHyper.density_constant)."""
    density = log_gaussian(0.0, scores, lambda_y) + offset
    logit = torch.log(mu) + density - torch.log1p(-mu)
    return torch.where(labels > 0, torch.ones_like(scores), torch.sigmoid(logit))


def log_likelihood(
    scores: Tensor, labels: Tensor, mu: Tensor, lambda_y: float, offset: float = 0.0
) -> Tensor:
    """Per pair log( mu_i N(y | m, 1/lambda_y) + (1 - mu_i) 1[y = 0] ), a marginal over a_ui
    (the density times exp(offset))."""
    exposed = torch.log(mu) + log_gaussian(labels, scores, lambda_y) + offset
    unexposed = torch.log1p(-mu).expand_as(exposed)
    return torch.where(labels > 0, exposed, torch.logaddexp(exposed, unexposed))


def log_posterior(
    theta: Tensor,
    beta: Tensor,
    mu: Tensor,
    labels: Tensor,
    weight: Tensor,
    hyper: ExpoMFHyper,
    users: Tensor | None = None,
) -> Tensor:
    """The MAP objective (1), 0-d float64: the marginal log-likelihood of the training pairs
    (weight 1; rows of `labels`/`weight` are `users`, default all) plus the log priors of
    theta, beta and mu (normalising constants included)."""
    users = torch.arange(theta.shape[0], device=theta.device) if users is None else users
    theta64, beta64, mu64 = theta.to(SOLVE_DTYPE), beta.to(SOLVE_DTYPE), mu.to(SOLVE_DTYPE)
    total = torch.zeros((), dtype=SOLVE_DTYPE, device=theta.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, labels.shape[1]))
    for start in range(0, users.numel(), rows):
        chunk = users[start : start + rows]
        scores = theta64[chunk] @ beta64.T
        y = labels[start : start + rows].to(SOLVE_DTYPE)
        per_pair = log_likelihood(scores, y, mu64, hyper.lambda_y, hyper.density_offset)
        total = total + torch.where(weight[start : start + rows] > 0, per_pair, 0.0).sum()
    total = total + _log_normal_prior(theta64, hyper.lambda_theta)
    total = total + _log_normal_prior(beta64, hyper.lambda_beta)
    a1, a2 = hyper.alpha1, hyper.alpha2
    log_beta_fn = math.lgamma(a1) + math.lgamma(a2) - math.lgamma(a1 + a2)
    # xlogy: 0 * log 0 = 0, so mu_i in {0, 1} is fine under the uniform prior.
    log_prior_mu = torch.xlogy(a1 - 1.0, mu64) + torch.special.xlog1py(a2 - 1.0, -mu64)
    return total + (log_prior_mu - log_beta_fn).sum()


def _log_normal_prior(factors: Tensor, precision: float) -> Tensor:
    rows, dim = factors.shape
    constant = 0.5 * dim * math.log(precision / (2.0 * math.pi))
    return rows * constant - 0.5 * precision * (factors**2).sum()


def ridge_solve(
    confidence: Tensor, targets: Tensor, factors: Tensor, lambda_y: float, lambda_reg: float
) -> Tensor:
    """Weighted ridge regressions (3)/(4), one per row r of `confidence` (R, C):
        x_r = (lambda_y sum_c w_rc f_c f_c^T + lambda_reg I)^-1 (lambda_y sum_c w_rc t_rc f_c),
    with w = confidence, t = targets (R, C) and f = factors (C, d). Returns (R, d) float64.

    sum_c w_rc f_c f_c^T for a block of rows is one GEMM, w (R', C') @ [f_c f_c^T] (C', d*d),
    chunked over rows and over c so that no work array exceeds CHUNK_ELEMENTS. (Keeping only
    the upper triangle halves the GEMM but the scatter back costs more than it saves.)"""
    n_rows, n_cols = confidence.shape
    dim = factors.shape[1]
    device = factors.device
    factors64 = factors.to(SOLVE_DTYPE)
    ridge = (lambda_reg / lambda_y) * torch.eye(dim, dtype=SOLVE_DTYPE, device=device)
    row_step = max(1, CHUNK_ELEMENTS // (dim * dim))
    col_step = max(1, CHUNK_ELEMENTS // max(dim * dim, row_step))
    out = torch.empty(n_rows, dim, dtype=SOLVE_DTYPE, device=device)
    for r0 in range(0, n_rows, row_step):
        r1 = min(n_rows, r0 + row_step)
        gram = torch.zeros(r1 - r0, dim * dim, dtype=SOLVE_DTYPE, device=device)
        rhs = torch.zeros(r1 - r0, dim, dtype=SOLVE_DTYPE, device=device)
        for c0 in range(0, n_cols, col_step):
            c1 = min(n_cols, c0 + col_step)
            f = factors64[c0:c1]
            w = confidence[r0:r1, c0:c1].to(SOLVE_DTYPE)
            gram += w @ (f[:, :, None] * f[:, None, :]).reshape(c1 - c0, dim * dim)
            rhs += (w * targets[r0:r1, c0:c1].to(SOLVE_DTYPE)) @ f
        cholesky = torch.linalg.cholesky(gram.view(r1 - r0, dim, dim) + ridge)
        out[r0:r1] = torch.cholesky_solve(rhs.unsqueeze(-1), cholesky).squeeze(-1)
    return out


def update_mu(confidence: Tensor, weight: Tensor, mu: Tensor, hyper: ExpoMFHyper) -> Tensor:
    """M-step (5) from the per-pair exposure posterior with held-out pairs at 0 (B, M) and the
    training-pair indicator (B, M). An item with no training pair under the uniform prior has
    an undefined update (0/0) and keeps its mu."""
    expected = confidence.to(SOLVE_DTYPE).sum(0)
    n_pairs = weight.to(SOLVE_DTYPE).sum(0)
    numerator = hyper.alpha1 + expected - 1.0
    denominator = hyper.alpha1 + hyper.alpha2 + n_pairs - 2.0
    new = numerator / denominator.clamp_min(1e-300)
    return torch.where(denominator > 0, new.clamp(0.0, 1.0), mu.to(SOLVE_DTYPE)).to(mu.dtype)


class ExpoMF(Method):
    """Exposure MF fitted by EM; `step` is one EM iteration over all users (sampling "full").

    Parameters (plain tensors, updated in place): theta (N, d), beta (M, d), mu (M,).
    """

    Hyper = ExpoMFHyper
    sampling = "full"

    def __init__(
        self,
        tensors: TrainingTensors,
        train: TrainConfig,
        hyper: ExpoMFHyper,
        generator: torch.Generator,
    ) -> None:
        super().__init__(tensors, train, hyper, generator)
        dtype, device = tensors.labels.dtype, tensors.device
        shape_u, shape_i = (tensors.n_users, train.dim), (tensors.n_items, train.dim)
        self.theta = torch.randn(shape_u, generator=generator, device=device) * train.init_std
        self.beta = torch.randn(shape_i, generator=generator, device=device) * train.init_std
        self.theta, self.beta = self.theta.to(dtype), self.beta.to(dtype)
        self.mu = torch.full((tensors.n_items,), hyper.init_mu, dtype=dtype, device=device)

    # -- EM ----------------------------------------------------------------------------------
    def posterior(self, users: Tensor, labels: Tensor) -> Tensor:
        """E-step (2) for `users` (B,) with their labels (B, M); (B, M) in the data's dtype."""
        hyper = self.hyper
        return exposure_posterior(
            self.preference(users), labels, self.mu, hyper.lambda_y, hyper.density_offset
        )

    def step(self, batch: Batch) -> dict[str, Tensor]:
        if batch.items is not None or batch.weight is None:
            raise UboError("ExpoMF needs a dense batch (items None, weight given)")
        if batch.users.numel() != self.tensors.n_users:
            raise UboError("ExpoMF's EM step needs every user in the batch (sampling 'full')")
        hyper, users, labels, weight = self.hyper, batch.users, batch.labels, batch.weight
        # Held-out pairs get confidence 0: they enter neither the sums of (3)-(5) nor N_i.
        confidence = self.posterior(users, labels) * weight
        theta = ridge_solve(confidence, labels, self.beta, hyper.lambda_y, hyper.lambda_theta)
        self.theta[users] = theta.to(self.theta.dtype)
        beta = ridge_solve(
            confidence.T, labels.T, self.theta[users], hyper.lambda_y, hyper.lambda_beta
        )
        self.beta.copy_(beta)
        self.mu.copy_(update_mu(confidence, weight, self.mu, hyper))
        objective = self.log_posterior(users, labels, weight)
        return {"train_loss": (-objective / weight.sum()).to(labels.dtype)}

    def log_posterior(self, users: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """The MAP objective (1) at the current parameters, 0-d float64."""
        return log_posterior(self.theta, self.beta, self.mu, labels, weight, self.hyper, users)

    # -- the interface -------------------------------------------------------------------------
    def preference(self, users: Tensor) -> Tensor:
        """theta_u . beta_i, (B, M): the mean of y_ui given exposure."""
        return self.theta[users] @ self.beta.T

    def scores(self, users: Tensor) -> Tensor:
        preference = self.preference(users)
        return preference if self.hyper.rank_by == "preference" else self.mu * preference

    def exposure(self, users: Tensor) -> Tensor:
        """E[a_ui]: 1 on training positives, p_ui (2) on the other training pairs and the
        prior mu_i on held-out pairs (their label is not seen in training)."""
        t = self.tensors
        posterior = self.posterior(users, t.labels[users])
        return torch.where(t.in_train[users], posterior, self.mu.expand_as(posterior))

    def state(self) -> dict[str, Tensor]:
        # Copies: `step` updates the parameters in place.
        return {"theta": self.theta.clone(), "beta": self.beta.clone(), "mu": self.mu.clone()}
