"""CJMF: combinational joint learning of relevance and propensity (Zhu, Wang, Caverlee,
RecSys 2020), a baseline of the UBO paper.

Read from the authors' reference code (Zziwei/Unbiased-Propensity-and-Recommendation,
`CJMF.py`, with `utility.negative_sampling_MF`); the paper's own text is not at hand here, so
the equations below are written as that code computes them, not with the paper's numbering.

Model. A click is relevance times exposure: P(y_ui = 1) = gamma_ui * theta_ui. There are C
sub-models c = 1..C, each a pair of
- relevance   gamma_c(u, i) = sigmoid(P_c[u] . Q_c[i])          (MF, no biases), and
- propensity  theta_c(i) = (w * sigmoid(Q_c[i] . c_c + d_c) + (1 - w) * pop_i)
                           ** sigmoid(Q_c[i] . e_c + f_c),       w = sigmoid(Q_c[i] . a_c + b_c),
  an item-only gate between a learned per-item value and the popularity prior
  pop_i = (n_i + 1) / max_j (n_j + 1), raised to a learned power; it reads the item through
  the relevance item embedding Q_c but never updates it.
Both are clipped to [clip, 1 - clip] inside every loss (`clip`, 0.01 in the reference; the
clipped value has zero gradient outside the interval, as tf.clip_by_value).

Losses, per pair, with y = R~ (1 on training positives):
- relevance, IPS with the propensity as weight (Saito et al.'s unbiased estimator):
      L_rel(gamma; theta) = -[ y/theta log gamma + (1 - y/theta) log(1 - gamma) ]
- propensity, the symmetric estimator with the inverse relevance as weight:
      L_exp(theta; gamma) = -[ y/gamma log theta + (1 - y/gamma) log(1 - theta) ]
  In each, the weight comes from another model and is a constant (no gradient).

Cross-fitting ("combinational" learning, avoiding the estimation-training overlap). The training
data is split into C folds. A pair of fold k trains every sub-model c != k (relevance with
L_rel, propensity with L_exp) and never sub-model k; its weights theta / gamma are sub-model
k's predictions, i.e. those of the one sub-model that has not been trained on that pair. (In the
reference, `generate_R_PR` writes sub-model m's predictions on fold m's positives into the
weight matrices R, Pr, and `train_model` steps every sub-model `update_id != m` on fold m.)

Residual component. Each sub-model has a residual copy of all its parameters (rP, rQ, ra..rf);
its relevance and propensity use the sums (P_c + rP_c, ...). The residuals are trained on all
the training data, every sub-model on every pair, with the click-likelihood loss of the product
(the UBO paper's L2 form, with the cross-fitted weights above as the other factor):
      L_res_rel = -[ y log(gamma_full * theta_in) + (1 - y) log(1 - gamma_full * theta_in) ]
      L_res_exp = -[ y log(gamma_in * theta_full) + (1 - y) log(1 - gamma_in * theta_full) ]
and only the residual parameters move (the main ones are constants there). The reference gives
them 1/13 of the learning rate (`residual_lr_scale`) and `beta` = 0.5 of the regularisation
(`residual_decay_scale`), and draws them with a third of the main parameters' init std.

Prediction. `scores` is the relevance of the combined model, mean_c gamma_full_c(u, i) (the
reference's `test_model`), returned as its logit. `exposure` (m_bar, for PCC) is the mean over
sub-models of the main propensities theta_c (the ones CJMF weights its losses with), clipped;
the UBO paper notes that its CJMF curve (Figure 3) leaves out the residual component.

Regularisation. The reference adds 0.5 * reg * ||.||^2 of whole tables to a batch-mean loss
under Adam, which is Adam's (coupled) weight decay: relevance tables decay with
`train.weight_decay` (reg = 5e-5 there), the propensity parameters with
`exposure_weight_decay` = alpha * reg = 220000 * 5e-5 = 11 (a strong pull of a..f towards 0,
i.e. towards theta = sqrt(1/4 + pop/2)); residuals with `residual_decay_scale` times each.

Adaptation to this project and simplifications:
- Folds over the dense N x M matrix: each (user, item) pair gets a fold once, at construction,
  from the method's generator: training positives are split into C equal folds at random (as
  the reference splits train_df) and so are the other pairs. The reference instead draws
  `neg` = 5 uniform negatives per positive afresh each epoch (negatives of fold m drawn for fold
  m's users and routed like fold m). Here every unlabeled pair is a negative, as for every method
  of this project, and it has a fixed fold. For y = 0 the main losses do not depend on the
  weight, so this only changes which sub-models see a negative; in the residual losses the
  weight of a negative is its fold's held-out propensity, where the reference used the average
  over all C sub-models (its negatives belong to no fold).
- Schedule: the reference loops over folds m (regenerating R, Pr from the current parameters),
  steps sub-models != m on fold m's batches, then makes one residual pass over all data. Here one
  `step` does all four updates on the trainer's batch at once: each sub-model's main loss is the
  mean over the batch's pairs outside its fold, its residual loss the mean over all of them, and
  the weights are the current (detached) held-out predictions. Because the held-out sub-model k
  is not trained on fold k and the main parameters are not trained in the residual phase, the
  reference's per-pass snapshot of R, Pr equals these current values except for the interleaving.
- Adam steps use `train.step_lr` (the reference: one lr for relevance and propensity) and
  `train.init_std` for the main parameters, normal rather than truncated normal; the reference's
  batch-size rescaling by (C - 1)/C and its dim (100) are not carried over.
- Pr's lower clip: the reference clips Pr where R < 0.01 (a typo); here both are clipped to
  [clip, 1 - clip].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ubo_core.config import TrainConfig
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.errors import ConfigError
from ubo_core.methods.base import Method, adam


@dataclass(frozen=True)
class CJMFHyper:
    n_models: int = 8  # C: sub-models = folds (the reference's --C)
    clip: float = 0.01  # gamma and theta are clipped to [clip, 1 - clip] in every loss
    exposure_weight_decay: float = 11.0  # propensity params: alpha * reg = 220000 * 5e-5
    residual_decay_scale: float = 0.5  # beta: residual weight decay relative to the main one
    residual_lr_scale: float = 1.0 / 13.0  # residual Adam lr relative to train.step_lr
    residual_init_scale: float = 1.0 / 3.0  # residual init std relative to train.init_std

    def __post_init__(self) -> None:
        if isinstance(self.n_models, bool) or not isinstance(self.n_models, int):
            raise ConfigError("n_models", f"expected an integer, got {self.n_models!r}")
        if not 2 <= self.n_models <= 127:  # cross-fitting needs two; folds are int8
            raise ConfigError("n_models", f"{self.n_models!r} is out of range [2, 127]")
        if not 0.0 < self.clip < 0.5:
            raise ConfigError("clip", f"{self.clip!r} is out of range (0, 0.5)")
        for key in ("exposure_weight_decay", "residual_decay_scale", "residual_init_scale"):
            if not 0.0 <= getattr(self, key) <= 1e6:
                raise ConfigError(key, f"{getattr(self, key)!r} is out of range [0, 1e6]")
        if not 0.0 < self.residual_lr_scale <= 100.0:
            raise ConfigError(
                "residual_lr_scale", f"{self.residual_lr_scale!r} is out of range (0, 100]"
            )


# -- pieces with hand-checkable values (tests use them directly) ------------------------------
def ips_pair_loss(prob: Tensor, other: Tensor, label: Tensor, clip: float) -> Tensor:
    """-[y/q log p + (1 - y/q) log(1 - p)] with p, q clipped to [clip, 1 - clip]: L_rel with
    (p, q) = (gamma, theta) and L_exp with (p, q) = (theta, gamma). Elementwise, broadcasting."""
    p = prob.clamp(clip, 1.0 - clip)
    weight = label / other.clamp(clip, 1.0 - clip)
    return -(weight * torch.log(p) + (1.0 - weight) * torch.log1p(-p))


def product_pair_loss(prob: Tensor, other: Tensor, label: Tensor, clip: float) -> Tensor:
    """-[y log(p q) + (1 - y) log(1 - p q)] with p, q clipped: the residual losses."""
    pq = prob.clamp(clip, 1.0 - clip) * other.clamp(clip, 1.0 - clip)
    return -(label * torch.log(pq) + (1.0 - label) * torch.log1p(-pq))


def popularity_prior(item_popularity: Tensor) -> Tensor:
    """pop_i = (n_i + 1) / max_j (n_j + 1), (M,) float32 (the reference's `prop`)."""
    counts = item_popularity.float() + 1.0
    return counts / counts.max()


def assign_folds(labels: Tensor, n_folds: int, generator: torch.Generator) -> Tensor:
    """(N, M) int8 fold of every pair: the positives (labels > 0) are split into `n_folds`
    folds whose sizes differ by at most one, in random order, and so are the other pairs."""
    flat = labels.reshape(-1) > 0
    folds = torch.empty(flat.numel(), dtype=torch.int8, device=labels.device)
    for group in (torch.nonzero(flat).view(-1), torch.nonzero(~flat).view(-1)):
        order = torch.randperm(group.numel(), generator=generator, device=labels.device)
        rank = torch.arange(group.numel(), device=labels.device)
        folds[group[order]] = (rank % n_folds).to(torch.int8)
    return folds.view(labels.shape)


def relevance_logits(
    user_emb: Tensor, item_emb: Tensor, users: Tensor, items: Tensor | None
) -> Tensor:
    """P_c[u] . Q_c[i] of every sub-model: (C, B) for pairs, (C, B, M) for items None."""
    rows = user_emb[:, users]
    if items is None:
        return rows @ item_emb.transpose(1, 2)
    return (rows * item_emb[:, items]).sum(-1)


def propensity(
    item_emb: Tensor, weight: Tensor, bias: Tensor, prior: Tensor, items: Tensor | None
) -> Tensor:
    """theta_c(i) of every sub-model, unclipped: (C, B) for pairs, (C, 1, M) for items None.

    weight (C, 3, d) and bias (C, 3) hold the reference's (a, b), (c, d), (e, f): the gate w,
    the learned per-item exposure and the power."""
    rows = item_emb if items is None else item_emb[:, items]  # (C, K, d)
    gate, own, power = torch.sigmoid(rows @ weight.transpose(1, 2) + bias[:, None, :]).unbind(-1)
    base = gate * own + (1.0 - gate) * (prior if items is None else prior[items])
    theta = base.pow(power)
    return theta if items is not None else theta[:, None, :]


def held_out(values: Tensor, fold: Tensor) -> Tensor:
    """values[fold[x], x]: each pair's prediction by the sub-model of its fold. values (C, ...)
    broadcastable to (C,) + fold.shape; fold (B,) or (B, M) int."""
    values = values.expand((values.shape[0], *fold.shape))
    return values.gather(0, fold.long()[None]).squeeze(0)


def per_model_mean(per_pair: Tensor, mask: Tensor | None, weight: Tensor | None) -> Tensor:
    """(C,) mean of per_pair (C, ...) over each sub-model's pairs: those where `mask` (C, ...)
    holds, weighted by the batch's training weight (dense blocks); 0 for a sub-model with none."""
    w = per_pair.new_ones(())
    if weight is not None:
        w = w * weight
    if mask is not None:
        w = w * mask
    w = w.expand_as(per_pair)
    dims = tuple(range(1, per_pair.ndim))
    return (per_pair * w).sum(dims) / w.sum(dims).clamp_min(1.0)


class CJMF(Method):
    Hyper = CJMFHyper

    def __init__(
        self,
        tensors: TrainingTensors,
        train: TrainConfig,
        hyper: CJMFHyper,
        generator: torch.Generator,
    ) -> None:
        super().__init__(tensors, train, hyper, generator)
        n, n_users, n_items, dim = hyper.n_models, tensors.n_users, tensors.n_items, train.dim

        def draw(shape: tuple[int, ...], std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(shape, generator=generator, device=self.device) * std)

        std, res_std = train.init_std, train.init_std * hyper.residual_init_scale
        self.user_emb = draw((n, n_users, dim), std)  # P_c
        self.item_emb = draw((n, n_items, dim), std)  # Q_c
        self.exposure_weight = draw((n, 3, dim), std)  # a_c, c_c, e_c
        self.exposure_bias = draw((n, 3), std)  # b_c, d_c, f_c
        self.res_user_emb = draw((n, n_users, dim), res_std)
        self.res_item_emb = draw((n, n_items, dim), res_std)
        self.res_exposure_weight = draw((n, 3, dim), res_std)
        self.res_exposure_bias = draw((n, 3), res_std)
        self.folds = assign_folds(tensors.labels, n, generator)
        self.prior = popularity_prior(tensors.item_popularity)
        self.model_ids = torch.arange(n, device=self.device)
        lr, residual_lr = train.step_lr, train.step_lr * hyper.residual_lr_scale
        decay, exposure_decay = train.weight_decay, hyper.exposure_weight_decay
        scale = hyper.residual_decay_scale
        self.optimizers = [
            adam([self.user_emb, self.item_emb], lr, decay),
            adam([self.exposure_weight, self.exposure_bias], lr, exposure_decay),
            adam([self.res_user_emb, self.res_item_emb], residual_lr, decay * scale),
            adam(
                [self.res_exposure_weight, self.res_exposure_bias],
                residual_lr,
                exposure_decay * scale,
            ),
        ]

    # -- the losses ----------------------------------------------------------------------
    def fold_of(self, batch: Batch) -> Tensor:
        """Fold of each of the batch's pairs: (B,) for pairs, (B, M) for a dense block."""
        if batch.items is None:
            return self.folds[batch.users]
        return self.folds[batch.users, batch.items]

    def sub_model_losses(self, batch: Batch) -> dict[str, Tensor]:
        """The four losses of every sub-model on `batch`, each (C,), with the gradient of each
        reaching only its own parameter group (main relevance, main propensity, residual
        relevance, residual propensity)."""
        clip, labels, weight = self.hyper.clip, batch.labels, batch.weight
        fold = self.fold_of(batch)
        users, items = batch.users, batch.items
        gamma = torch.sigmoid(relevance_logits(self.user_emb, self.item_emb, users, items))
        theta = propensity(
            self.item_emb.detach(), self.exposure_weight, self.exposure_bias, self.prior, items
        )
        # Cross-fitted weights: each pair's held-out sub-model, constants in every loss.
        gamma_in = held_out(gamma.detach(), fold)
        theta_in = held_out(theta.detach(), fold)
        outside_fold = fold[None] != self.model_ids.view(-1, *([1] * fold.ndim))

        user_full = self.user_emb.detach() + self.res_user_emb
        item_full = self.item_emb.detach() + self.res_item_emb
        gamma_full = torch.sigmoid(relevance_logits(user_full, item_full, users, items))
        theta_full = propensity(
            item_full.detach(),
            self.exposure_weight.detach() + self.res_exposure_weight,
            self.exposure_bias.detach() + self.res_exposure_bias,
            self.prior,
            items,
        )
        return {
            "relevance": per_model_mean(
                ips_pair_loss(gamma, theta_in, labels, clip), outside_fold, weight
            ),
            "exposure": per_model_mean(
                ips_pair_loss(theta, gamma_in, labels, clip), outside_fold, weight
            ),
            "residual_relevance": per_model_mean(
                product_pair_loss(gamma_full, theta_in, labels, clip), None, weight
            ),
            "residual_exposure": per_model_mean(
                product_pair_loss(theta_full, gamma_in, labels, clip), None, weight
            ),
        }

    def step(self, batch: Batch) -> dict[str, Tensor]:
        losses = self.sub_model_losses(batch)
        # The groups' parameters are disjoint and each loss reaches only its own group, so one
        # backward of the sum gives every group exactly its own loss's gradient.
        total = sum(loss.sum() for loss in losses.values())
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        total.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        means = {name: loss.detach().mean() for name, loss in losses.items()}
        return {
            "train_loss": means["relevance"],
            "exposure_loss": means["exposure"],
            "residual_loss": means["residual_relevance"],
            "residual_exposure_loss": means["residual_exposure"],
        }

    # -- the interface ---------------------------------------------------------------------
    def scores(self, users: Tensor) -> Tensor:
        """logit of mean_c sigmoid(s_c), s_c the combined (main + residual) logits, (B, M)."""
        logits = relevance_logits(
            self.user_emb + self.res_user_emb, self.item_emb + self.res_item_emb, users, None
        )
        # log mean sigmoid - log mean (1 - sigmoid), exactly (log C cancels) and without
        # rounding the mean to 1 for large logits.
        return torch.logsumexp(F.logsigmoid(logits), 0) - torch.logsumexp(F.logsigmoid(-logits), 0)

    def exposure(self, users: Tensor) -> Tensor:
        """mean_c theta_c(i) of the main sub-models, clipped to [clip, 1 - clip], (B, M)."""
        theta = propensity(
            self.item_emb, self.exposure_weight, self.exposure_bias, self.prior, None
        ).mean(0)
        clip = self.hyper.clip
        return theta.clamp(clip, 1.0 - clip).expand(users.numel(), -1)

    def state(self) -> dict[str, Tensor]:
        names = ("user_emb", "item_emb", "exposure_weight", "exposure_bias")
        return {
            prefix + name: getattr(self, prefix + name).detach()
            for prefix in ("", "res_")
            for name in names
        }
