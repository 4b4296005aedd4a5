"""The loss estimators of the paper and their closed-form properties (torch).

Shapes are elementwise: every function takes broadcastable tensors of relevance logits s
(p = sigmoid(s)), exposure m in (0, 1] and labels y = R~ in {0, 1}, and returns the per-pair
loss; callers reduce. Logits rather than p keep log p and log(1 - p) exact for large |s|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# log(1 - m p) needs 1 - m p > 0; m p < 1 holds mathematically for p < 1, but float32
# rounds sigmoid(s) to 1 for s > 17: keep a tiny floor.
_MIN_ONE_MINUS = 1e-7
# A learnt exposure can underflow to exactly 0 in float32 (sigmoid of a large negative score,
# theta_i = 0 for an item without training positives). On a negative pair the y * log(m p)
# term is then 0 * -inf = NaN, in the loss and in dL/dm: UBO in dense mode on Yahoo diverged
# to NaN this way. The floor sits far below any exposure that matters.
_MIN_EXPOSURE = 1e-12


def ips_loss(logit: Tensor, exposure: Tensor, label: Tensor) -> Tensor:
    """L1, the IPS / RelMF estimator (Eq. 4), per pair:
    -[(y/m) log p + (1 - y/m) log(1 - p)]."""
    weight = label / exposure
    return -(weight * F.logsigmoid(logit) + (1.0 - weight) * F.logsigmoid(-logit))


def low_variance_loss(logit: Tensor, exposure: Tensor, label: Tensor) -> Tensor:
    """L2, the paper's low-variance estimator (Eq. 10), per pair:
    -[y log(m p) + (1 - y) log(1 - m p)]."""
    log_mp = torch.log(exposure.clamp_min(_MIN_EXPOSURE)) + F.logsigmoid(logit)
    one_minus_mp = (1.0 - exposure * torch.sigmoid(logit)).clamp_min(_MIN_ONE_MINUS)
    return -(label * log_mp + (1.0 - label) * torch.log(one_minus_mp))


def ips_loss_slope(logit: Tensor, exposure: Tensor, label: Tensor) -> Tensor:
    """dL1/ds of `ips_loss` per pair, in closed form: sigmoid(s) - y/m."""
    return torch.sigmoid(logit) - label / exposure


def low_variance_slope(logit: Tensor, exposure: Tensor, label: Tensor) -> Tensor:
    """dL2/ds of `low_variance_loss` per pair (UMF's fast step): the `s` of
    `low_variance_derivatives` without the rest."""
    p = torch.sigmoid(logit)
    one_minus_raw = 1.0 - exposure * p
    negative = (1.0 - label) * (one_minus_raw >= _MIN_ONE_MINUS)
    return label * (p - 1.0) + negative * exposure * p * (1.0 - p) / one_minus_raw.clamp_min(
        _MIN_ONE_MINUS
    )


@dataclass(frozen=True)
class LowVarianceDerivatives:
    """Partial derivatives of `low_variance_loss` per pair in its logit s and exposure m,
    with the clamps' zero-gradient regions as autograd sees them (hand-derived steps use
    them instead of autograd; tests compare the two):

        l_s  = -y (1 - p) + (1 - y) m p (1 - p) / (1 - m p)
        l_m  = -y / m + (1 - y) p / (1 - m p)
        l_sm = (1 - y) p (1 - p) / (1 - m p)^2
        l_mm = y / m^2 + (1 - y) p^2 / (1 - m p)^2
    """

    s: Tensor
    m: Tensor
    sm: Tensor | None = None
    mm: Tensor | None = None


def low_variance_derivatives(
    logit: Tensor, exposure: Tensor, label: Tensor, second_order: bool = False
) -> LowVarianceDerivatives:
    p = torch.sigmoid(logit)
    one_minus_raw = 1.0 - exposure * p
    # clamp_min passes the gradient where its input is >= the floor and blocks it below.
    negative = (1.0 - label) * (one_minus_raw >= _MIN_ONE_MINUS)
    positive = label * (exposure >= _MIN_EXPOSURE)
    inv_one_minus = 1.0 / one_minus_raw.clamp_min(_MIN_ONE_MINUS)
    inv_exposure = 1.0 / exposure.clamp_min(_MIN_EXPOSURE)
    slope_p = p * (1.0 - p)
    neg_p = negative * p * inv_one_minus  # (1 - y) p / (1 - m p)
    d_s = label * (p - 1.0) + neg_p * exposure * (1.0 - p)
    d_m = neg_p - positive * inv_exposure
    if not second_order:
        return LowVarianceDerivatives(d_s, d_m)
    d_sm = negative * slope_p * inv_one_minus**2
    d_mm = positive * inv_exposure**2 + negative * (p * inv_one_minus) ** 2
    return LowVarianceDerivatives(d_s, d_m, d_sm, d_mm)


def log_loss(logit: Tensor, label: Tensor) -> Tensor:
    """Plain binary log loss, L2 with m = 1: the validation loss on the unbiased set."""
    return F.binary_cross_entropy_with_logits(logit, label, reduction="none")


def bpr_loss(positive_logit: Tensor, negative_logit: Tensor) -> Tensor:
    """Bayesian personalised ranking (Rendle et al.): -log sigmoid(s_ui - s_uj)."""
    return -F.logsigmoid(positive_logit - negative_logit)


def item_popularity_exposure(n_positives: Tensor, power: float = 0.5) -> Tensor:
    """theta_i = (n_i / max_j n_j) ** power (Eq. 12, power 0.5)."""
    if n_positives.max() <= 0:
        raise ValueError("item popularity needs at least one training positive")
    return (n_positives.double() / n_positives.max()) ** power


def block_rows(table: Tensor, rows: Tensor, like: Tensor) -> Tensor:
    """table[rows] in `like`'s dtype: a dense block's labels or cell weights, read from a whole
    0/1 table (training's byte tables, `Block.cell_tables`) or from rows already gathered
    (rows 0..B-1). The dense kernels below take (table, table, rows) rather than the gathered
    (B, M) rows, so that a compiled kernel reads each cell's byte where it lies instead of a
    copy in float32 (docs/PERFORMANCE.md)."""
    return table.index_select(0, rows).to(like.dtype)


def low_variance_block(
    logit: Tensor, exposure: Tensor, label: Tensor, weight: Tensor, rows: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """Dense mode's L2 step in few passes over a block (B, M) of cells with binary labels:
    (l_s * weight * scale, the weighted loss sum * scale), with `low_variance_slope`'s and
    `low_variance_loss`'s values and clamps; the labels and weights are label[rows] and
    weight[rows] (`block_rows`). Per cell one sigmoid and one log: the loss reads log(m p) on
    positives and log(1 - m p) on negatives from one `where`. `logit` is consumed
    (overwritten)."""
    label, weight = block_rows(label, rows, logit), block_rows(weight, rows, logit)
    p = torch.sigmoid(logit, out=logit)
    mp = exposure * p
    one_minus = torch.rsub(mp, 1.0)
    inside = one_minus >= _MIN_ONE_MINUS
    one_minus.clamp_min_(_MIN_ONE_MINUS)
    positive = label > 0
    # log(m p) = log(m) + logsigmoid(s) up to rounding while m p is a normal float, which the
    # clamps below keep it.
    picked = torch.where(positive, mp.clamp_min(_MIN_EXPOSURE * 1e-30), one_minus)
    loss = -torch.dot(picked.log_().view(-1), weight.reshape(-1).to(picked.dtype)) * scale
    # negatives: m p (1 - p) / (1 - m p) where 1 - m p is above its floor; positives: p - 1.
    slope = mp.mul_(torch.rsub(p, 1.0)).div_(one_minus).mul_(inside)
    slope = torch.where(positive, p.sub_(1.0), slope)
    return slope.mul_(weight).mul_(scale), loss


def ips_block(
    logit: Tensor, exposure: Tensor, label: Tensor, weight: Tensor, rows: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """`low_variance_block` for L1 (RelMF): slope sigmoid(s) - y/m, and the loss through
    log(1 - p) = log p - s, i.e. -[(y/m) log p + (1 - y/m) log(1 - p)] = -log p + (1 - y/m) s,
    one logsigmoid per cell. `logit` is consumed."""
    label, weight = block_rows(label, rows, logit), block_rows(weight, rows, logit)
    ratio = label / exposure
    log_p = F.logsigmoid(logit)
    per_cell = torch.rsub(ratio, 1.0).mul_(logit).sub_(log_p)
    loss = torch.dot(per_cell.view(-1), weight.reshape(-1).to(per_cell.dtype)) * scale
    slope = torch.sigmoid(logit, out=logit).sub_(ratio)
    return slope.mul_(weight).mul_(scale), loss


# -- dense mode's cells as single expressions: what ubo_core.fused compiles into one loop ----
# Each computes the same values and clamps as the eager forms above (tests compare them), out
# of place and without data-dependent control flow, so torch.compile fuses every elementwise
# operation of a block step into one pass over the (B, M) cells instead of a dozen.


def low_variance_cells(
    logit: Tensor, exposure: Tensor, label: Tensor, weight: Tensor, rows: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """`low_variance_block` out of place: (l_s * weight * scale, weighted loss sum * scale)."""
    label, weight = block_rows(label, rows, logit), block_rows(weight, rows, logit)
    p = torch.sigmoid(logit)
    mp = exposure * p
    one_minus_raw = 1.0 - mp
    one_minus = one_minus_raw.clamp_min(_MIN_ONE_MINUS)
    positive = label > 0
    picked = torch.where(positive, mp.clamp_min(_MIN_EXPOSURE * 1e-30), one_minus)
    loss = -(picked.log() * weight).sum() * scale
    negative = torch.where(one_minus_raw >= _MIN_ONE_MINUS, mp * (1.0 - p) / one_minus, 0.0)
    slope = torch.where(positive, p - 1.0, negative)
    return slope * weight * scale, loss


def ips_cells(
    logit: Tensor, exposure: Tensor, label: Tensor, weight: Tensor, rows: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """`ips_block` out of place, sigmoid and logsigmoid from one exp: with e = exp(-|s|),
    log p = min(s, 0) - log1p(e) and p = (1 or e) / (1 + e) as s >= 0 or not."""
    label, weight = block_rows(label, rows, logit), block_rows(weight, rows, logit)
    ratio = label / exposure
    e = torch.exp(-logit.abs())
    log_p = logit.clamp_max(0.0) - torch.log1p(e)
    loss = (((1.0 - ratio) * logit - log_p) * weight).sum() * scale
    p = torch.where(logit >= 0, 1.0, e) / (1.0 + e)
    return (p - ratio) * weight * scale, loss


def _mixed_exposure_partials(
    logit: Tensor, personal_logit: Tensor, gate: Tensor, theta: Tensor, label: Tensor
) -> tuple[Tensor, ...]:
    """m = r q + (1 - r) theta with q = sigmoid(E W^T) (Eq. 13), and L2's pieces on a block:
    p, q, m, m p, the clamped 1 - m p, the positive mask and a = p / (1 - m p) on the
    negatives (0 where 1 - m p is clamped): the quantities of `low_variance_derivatives`."""
    q = torch.sigmoid(personal_logit)
    m = gate * q + (1.0 - gate) * theta
    p = torch.sigmoid(logit)
    mp = m * p
    one_minus_raw = 1.0 - mp
    one_minus = one_minus_raw.clamp_min(_MIN_ONE_MINUS)
    a = torch.where(one_minus_raw >= _MIN_ONE_MINUS, p / one_minus, 0.0)
    return p, q, m, mp, one_minus, label > 0, a


def _mixed_loss_slope(p: Tensor, m: Tensor, positive: Tensor, a: Tensor) -> Tensor:
    """l_s from `_mixed_exposure_partials`' pieces: p - 1 on positives, m (1 - p) a on
    negatives (`low_variance_derivatives`' s)."""
    return torch.where(positive, p - 1.0, m * (1.0 - p) * a)


def _exposure_split(coef: Tensor, gate: Tensor, q: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """A per-cell coefficient c of dm split along m = r q + (1 - r) theta into the exposure
    net's two paths: (c r q', c (q - theta) r'), q' = q (1 - q) and r' = r (1 - r)."""
    return coef * gate * (q * (1.0 - q)), coef * (q - theta) * (gate * (1.0 - gate))


def mixed_exposure_cells(
    logit: Tensor,
    personal_logit: Tensor,
    gate: Tensor,
    theta: Tensor,
    label: Tensor,
    weight: Tensor,
    rows: Tensor,
    scale: Tensor,
    exposure_grads: bool,
) -> tuple[Tensor, ...]:
    """L2 with the exposure net m_a on a block of users x all items (the relevance step and
    JointOpt's / AlterOpt's step on L_train): from the logits s = U W^T, the exposure logits
    E W^T, the gate r (M,) and theta (M,), returns l_s * weight * scale and the weighted loss
    sum * scale, and with `exposure_grads` the coefficients of the exposure gradients,
    c_e = l_m w scale r q' and c_g = l_m w scale (q - theta) r' (q' = q (1 - q), r' likewise),
    which `ExposureMF.block_exposure_gradients` turns into dL/de_u, dL/dg and dL/db. The labels
    and weights are label[rows] and weight[rows] (`block_rows`), as in every kernel below."""
    label, weight = block_rows(label, rows, logit), block_rows(weight, rows, logit)
    p, q, m, mp, one_minus, positive, a = _mixed_exposure_partials(
        logit, personal_logit, gate, theta, label
    )
    slope = _mixed_loss_slope(p, m, positive, a) * weight * scale
    picked = torch.where(positive, mp.clamp_min(_MIN_EXPOSURE * 1e-30), one_minus)
    loss = -(picked.log() * weight).sum() * scale
    if not exposure_grads:
        return slope, loss
    inv_m = torch.where(m >= _MIN_EXPOSURE, 1.0 / m.clamp_min(_MIN_EXPOSURE), 0.0)
    loss_m = torch.where(positive, -inv_m, a) * weight * scale
    return slope, loss, *_exposure_split(loss_m, gate, q, theta)


def mixed_exposure_slope(
    logit: Tensor,
    personal_logit: Tensor,
    gate: Tensor,
    theta: Tensor,
    label: Tensor,
    weight: Tensor,
    rows: Tensor,
) -> Tensor:
    """l_s * weight on a block with the exposure net's m (UBO's inner gradient G = (l_s w) W)."""
    label, weight = block_rows(label, rows, logit), block_rows(weight, rows, logit)
    p, _, m, _, _, positive, a = _mixed_exposure_partials(logit, personal_logit, gate, theta, label)
    return _mixed_loss_slope(p, m, positive, a) * weight


def mixed_exposure_hyper_coefficients(
    coupling: Tensor,
    logit: Tensor,
    personal_logit: Tensor,
    gate: Tensor,
    theta: Tensor,
    label: Tensor,
    weight: Tensor,
    rows: Tensor,
    neg_eta: Tensor,
) -> tuple[Tensor, Tensor]:
    """UBO's hypergradient coefficients on a block (Eq. 16-17): with C the coupling
    A_U W^T + U A_W^T and c = -eta C l_sm w, returns (c r q', c (q - theta) r')."""
    label, weight = block_rows(label, rows, logit), block_rows(weight, rows, logit)
    p, q, _, _, one_minus, positive, a = _mixed_exposure_partials(
        logit, personal_logit, gate, theta, label
    )
    loss_sm = torch.where(positive, 0.0, (1.0 - p) * a / one_minus)
    return _exposure_split(coupling * loss_sm * weight * neg_eta, gate, q, theta)
