"""Relevance MF trained with the low-variance estimator L2 and the exposure net m_a (Eq. 13).

UBO and its ablations JointOpt, AlterOpt and BiOpt2 share everything here and differ only
in how their `step` updates the exposure parameters a (each in its own module).

The bi-level step (Eq. 15 and the outer problem):
    w' = w - eta * dL_train(w, a)/dw          (one unrolled SGD step, differentiable in a)
    a  <- Adam step on d L_outer(w'(a)) / da  (UBO: log loss on the unbiased validation set,
                                               m = 1; BiOpt2: L2 on the same training batch
                                               with m_bar)
    w  <- Adam step on L_train(w, a_new)
The unrolled step uses the batch-summed training loss (the paper's L is a sum over D), so its
eta is a step size per pair and does not shrink with the batch size; the outer loss is summed
too, which keeps the hypergradient far above Adam's epsilon. In dense mode a row's gradient
sums over a whole block, hence a separate `dense_inner_lr`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ubo_core import fused
from ubo_core.config import TrainConfig, check_choice
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.errors import ConfigError
from ubo_core.estimators import log_loss, low_variance_derivatives, low_variance_loss
from ubo_core.methods.base import (
    ExposureNet,
    Method,
    RelevanceMF,
    exposure_from_rows,
    gather_items,
    row_logits,
)
from ubo_core.methods.rows import RowAdam, RowSGD, RowSubset, unique_rows

EXPOSURE_OPTIMIZERS: dict[str, type[RowAdam]] = {"adam": RowAdam, "sgd": RowSGD}


@dataclass(frozen=True)
class ExposureHyper:
    exposure_lr: float = 1e-3  # eta': Adam learning rate of a, paper mode
    dense_exposure_lr: float = 1e-2  # the same in dense mode (larger batches)
    exposure_weight_decay: float = 0.0
    inner_lr: float = 0.1  # eta of the unrolled step (Eq. 15), paper mode
    dense_inner_lr: float = 1e-3  # the same in dense mode
    # Eq. 13 feeds the relevance item embedding w_i into m_a (in r(w_i) and sigma(e_u . w_i)).
    # False, the paper's derivation (Eq. 16-17, whose inner gradient has l_s terms only):
    # m_a reads w_i as an input and L_train's gradient in w has no l_m dm/dw_i term, in the
    # relevance step, in the unrolled step of Eq. 15 and in JointOpt's joint step; w is fitted
    # through p alone and a is moved only by its own update rule. True keeps that term: then
    # every relevance step also fits the exposure on L_train through w_i (JointOpt's behaviour
    # inside UBO; docs/FIDELITY.md measures it).
    item_grad_through_exposure: bool = False
    # The outer update of a. The paper: "we update a by ... a gradient descent step with the
    # outer loop learning rate eta'" (Sec. 2, after Eq. 15), with Adam named for training as
    # a whole (Sec. 3.1). "adam" (default: the hypergradient's scale moves by orders of
    # magnitude with eta and the batch, which Adam's normalisation absorbs) or "sgd", the
    # plain step; it applies to a in all four methods (JointOpt's and AlterOpt's too).
    exposure_optimizer: str = "adam"
    # b of the gate r = sigmoid(Linear(w_i)) = sigmoid(w_i . g + b) at initialisation (Eq. 13;
    # the paper gives no initialisation). 0 starts r near 1/2 and, with sigmoid(e_u . w_i)
    # near 1/2, m_a near 0.25 + 0.5 theta_i; -4 starts m_a within 2% of theta_i, UMF's
    # exposure (Eq. 12).
    gate_init_bias: float = 0.0

    def __post_init__(self) -> None:
        for key in ("exposure_lr", "dense_exposure_lr", "inner_lr", "dense_inner_lr"):
            if not 0.0 < getattr(self, key) <= 100.0:
                raise ConfigError(key, f"{getattr(self, key)!r} is out of range (0, 100]")
        if not self.exposure_weight_decay >= 0:  # NaN fails this too
            raise ConfigError("exposure_weight_decay", "must be >= 0")
        check_choice("exposure_optimizer", self.exposure_optimizer, EXPOSURE_OPTIMIZERS)
        if not -20.0 <= self.gate_init_bias <= 20.0:
            raise ConfigError(
                "gate_init_bias", f"{self.gate_init_bias!r} is out of range [-20, 20]"
            )


@dataclass
class StepRows:
    """The leaves one step differentiates: relevance rows (users, items, with the validation
    pairs' rows as `extra` for UBO), exposure user rows and the gate."""

    users: RowSubset
    items: RowSubset
    exposure_users: RowSubset
    gate_weight: Tensor
    gate_bias: Tensor
    val_labels: Tensor | None = None  # labels of the validation pairs drawn with the rows

    def exposure_leaves(self) -> list[Tensor]:
        return [self.exposure_users.values, self.gate_weight, self.gate_bias]

    def exposure_rows(self) -> list[Tensor | None]:
        return [self.exposure_users.rows, None, None]


OuterLoss = Callable[[Tensor, Tensor, StepRows, Batch], Tensor]


@dataclass
class PairTerms:
    """Per-pair quantities of L2 with m_a at the current parameters, for the hand-derived
    paper-mode steps: w_u, w_i, e_u rows (B, d); s = w_u . w_i; q = sigmoid(e_u . w_i);
    r = sigmoid(w_i . g + b); m = r q + (1 - r) theta_i."""

    user_rows: Tensor
    item_rows: Tensor
    exposure_rows: Tensor
    gate_weight: Tensor  # g as a (1, d) row
    logits: Tensor
    personal: Tensor
    gate: Tensor
    theta: Tensor
    exposure: Tensor

    @property
    def personal_slope(self) -> Tensor:  # q' = q (1 - q)
        return self.personal * (1.0 - self.personal)

    @property
    def gate_slope(self) -> Tensor:  # r' = r (1 - r)
        return self.gate * (1.0 - self.gate)

    def exposure_item_slope(self) -> Tensor:
        """dm/dw_i = r q' e_u + (q - theta) r' g, (B, d)."""
        personal_coef = (self.gate * self.personal_slope).unsqueeze(-1)
        gate_coef = ((self.personal - self.theta) * self.gate_slope).unsqueeze(-1)
        return personal_coef * self.exposure_rows + gate_coef * self.gate_weight


@dataclass
class BlockTerms:
    """The same quantities on a block of users against all items: U, E rows (B, d), the item
    table W (M, d), the logits s = U W^T and the exposure logits E W^T (B, M), the gate r and
    theta (M,), and the block's labels and training cells' weights as tables and rows
    (`Batch.cell_tables`). q = sigmoid(E W^T) and m = r q + (1 - r) theta are formed inside
    the fused kernels (ubo_core/fused.py)."""

    user_rows: Tensor
    item_table: Tensor
    exposure_rows: Tensor
    logits: Tensor
    personal_logits: Tensor
    gate: Tensor
    theta: Tensor
    cell_tables: tuple[Tensor, Tensor, Tensor]

    def cells(self) -> tuple[Tensor, ...]:
        """The per-cell arguments every mixed-exposure kernel starts with."""
        return self.logits, self.personal_logits, self.gate, self.theta, *self.cell_tables


class ExposureMF(Method):
    Hyper = ExposureHyper

    def __init__(
        self,
        tensors: TrainingTensors,
        train: TrainConfig,
        hyper: ExposureHyper,
        generator: torch.Generator,
    ) -> None:
        super().__init__(tensors, train, hyper, generator)
        self.relevance = RelevanceMF(tensors, train, generator)
        self.exposure_net = ExposureNet(tensors, train, generator)
        self.user_emb, self.item_emb = self.relevance.user_emb, self.relevance.item_emb
        self.exposure_user_emb = self.exposure_net.user_emb
        self.gate_weight, self.gate_bias = (
            self.exposure_net.gate_weight,
            self.exposure_net.gate_bias,
        )
        # (batch, U W^T) of the last exposure-only block step, for `block_terms`.
        self._kept_logits: tuple[Batch, Tensor, int] | None = None
        paper = train.mode == "paper"
        self.inner_lr = hyper.inner_lr if paper else hyper.dense_inner_lr
        exposure_lr = hyper.exposure_lr if paper else hyper.dense_exposure_lr
        lazy = train.optimizer == "lazy_adam"
        self.relevance_optimizer = RowAdam(
            self.relevance.parameters(), train.step_lr, train.weight_decay, lazy
        )
        self.gate_bias.data.fill_(hyper.gate_init_bias)
        self.exposure_optimizer = EXPOSURE_OPTIMIZERS[hyper.exposure_optimizer](
            self.exposure_net.parameters(), exposure_lr, hyper.exposure_weight_decay, lazy
        )

    # -- the training loss L2 with m_a ------------------------------------------------------
    def rows(self, batch: Batch, with_validation: bool = False) -> StepRows:
        val_users = val_items = val_labels = None
        if with_validation:
            val_users, val_items, val_labels = self.validation_batch()
        return StepRows(
            RowSubset(self.user_emb, batch.users, val_users),
            RowSubset(self.item_emb, batch.items, val_items),
            RowSubset(self.exposure_user_emb, batch.users),
            self.gate_weight.detach().clone().requires_grad_(),
            self.gate_bias.detach().clone().requires_grad_(),
            val_labels,
        )

    def rows_loss(
        self, user_values: Tensor, item_values: Tensor, rows: StepRows, batch: Batch, reduce: str
    ) -> Tensor:
        """L2 with m_a on the batch, at relevance row values `user_values`/`item_values`
        (the leaves, or w' in the bi-level step)."""
        pairs = batch.items is not None
        user_rows = rows.users.gather(user_values)
        item_rows = rows.items.gather(item_values)
        exposure = exposure_from_rows(
            rows.exposure_users.gather(),
            self.exposure_input(item_rows),
            rows.gate_weight,
            rows.gate_bias,
            gather_items(self.exposure_net.theta, batch.items),
            pairs,
        )
        per_pair = low_variance_loss(
            row_logits(user_rows, item_rows, pairs), exposure, batch.labels
        )
        return batch.reduce_mean(per_pair) if reduce == "mean" else batch.reduce_sum(per_pair)

    def exposure_input(self, item_rows: Tensor) -> Tensor:
        """w_i as m_a sees it: detached unless `item_grad_through_exposure` (ExposureHyper)."""
        return item_rows if self.hyper.item_grad_through_exposure else item_rows.detach()

    # -- update rules the four methods compose -------------------------------------------
    # Each rule has hand-derived forms, gradients in closed form without an autograd graph:
    # `pair_*` for paper mode's pairs and `block_*` for dense mode's blocks (a few GEMMs and
    # elementwise passes, where autograd's chain of operations over the block's cells took
    # most of the time), and the autograd form, which tests compare them with
    # (`hand_derived = False` makes both modes use it). Dense mode with
    # `item_grad_through_exposure` stays on autograd (a knob for measurements, not a default).
    hand_derived = True

    def _use_hand_derived(self, batch: Batch) -> bool:
        if batch.items is None and self.hyper.item_grad_through_exposure:
            return False
        return self.hand_derived

    def relevance_step(self, batch: Batch) -> Tensor:
        """Adam step of w on L_train(w, a) with a held fixed."""
        if self._use_hand_derived(batch):
            if batch.items is None:
                return self.block_joint_step(batch, relevance=True, exposure=False)
            return self.pair_relevance_step(batch)
        rows = self.rows(batch)
        loss = self.rows_loss(rows.users.values, rows.items.values, rows, batch, "mean")
        grads = torch.autograd.grad(loss, [rows.users.values, rows.items.values])
        self.relevance_optimizer.step([(rows.users.rows, grads[0]), (rows.items.rows, grads[1])])
        return loss.detach()

    def exposure_step_on_train(self, batch: Batch) -> Tensor:
        """Adam step of a on L_train(w, a) with w held fixed (AlterOpt)."""
        if self._use_hand_derived(batch):
            if batch.items is None:
                return self.block_joint_step(batch, relevance=False, exposure=True)
            return self.pair_exposure_step(batch)
        rows = self.rows(batch)
        loss = self.rows_loss(
            rows.users.values.detach(), rows.items.values.detach(), rows, batch, "mean"
        )
        self._exposure_update(rows, torch.autograd.grad(loss, rows.exposure_leaves()))
        return loss.detach()

    def joint_step(self, batch: Batch) -> Tensor:
        """One Adam step of w and a together on L_train(w, a) (JointOpt)."""
        if self._use_hand_derived(batch):
            if batch.items is None:
                return self.block_joint_step(batch, relevance=True, exposure=True)
            return self.pair_joint_step(batch)
        rows = self.rows(batch)
        loss = self.rows_loss(rows.users.values, rows.items.values, rows, batch, "mean")
        leaves = [rows.users.values, rows.items.values, *rows.exposure_leaves()]
        grads = torch.autograd.grad(loss, leaves)
        self.relevance_optimizer.step([(rows.users.rows, grads[0]), (rows.items.rows, grads[1])])
        self._exposure_update(rows, grads[2:])
        return loss.detach()

    def bilevel_exposure_step(
        self, batch: Batch, outer: OuterLoss, with_validation: bool
    ) -> Tensor:
        """Adam step of a on the hypergradient d outer(w'(a)) / da, w' = w - eta dL/dw."""
        rows = self.rows(batch, with_validation)
        inner = self.rows_loss(rows.users.values, rows.items.values, rows, batch, "sum")
        grad_users, grad_items = torch.autograd.grad(
            inner, [rows.users.values, rows.items.values], create_graph=True
        )
        user_next = rows.users.values - self.inner_lr * grad_users
        item_next = rows.items.values - self.inner_lr * grad_items
        outer_loss = outer(user_next, item_next, rows, batch)
        hypergrad = torch.autograd.grad(outer_loss, rows.exposure_leaves(), allow_unused=True)
        self._exposure_update(rows, hypergrad)
        return outer_loss.detach()

    def validation_bilevel_step(self, batch: Batch) -> Tensor:
        """UBO's exposure update: the bi-level step with the validation log loss as outer."""
        if self._use_hand_derived(batch):
            if batch.items is None:
                return self.block_validation_bilevel_step(batch)
            return self.pair_validation_bilevel_step(batch)
        return self.bilevel_exposure_step(batch, self.validation_outer, with_validation=True)

    def validation_outer(
        self, user_next: Tensor, item_next: Tensor, rows: StepRows, batch: Batch
    ) -> Tensor:
        """UBO's outer loss: log loss of p' on (a batch of) the unbiased validation set, m = 1.
        `rows` was built with the validation pairs as `extra` (same draw)."""
        user_rows = rows.users.gather(user_next, "extra")
        item_rows = rows.items.gather(item_next, "extra")
        assert rows.val_labels is not None
        return log_loss((user_rows * item_rows).sum(-1), rows.val_labels).sum()

    def validation_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        t = self.tensors
        size = self.train.val_batch_size
        if t.val_users.numel() <= size:
            return t.val_users, t.val_items, t.val_labels
        pick = torch.randint(
            t.val_users.numel(), (size,), generator=self.generator, device=self.device
        )
        return tuple(x.index_select(0, pick) for x in (t.val_users, t.val_items, t.val_labels))

    def _exposure_update(self, rows: StepRows, grads: tuple[Tensor | None, ...] | list) -> None:
        leaves = rows.exposure_leaves()
        filled = [
            torch.zeros_like(leaf) if g is None else g
            for leaf, g in zip(leaves, grads, strict=True)
        ]
        self.exposure_optimizer.step(list(zip(rows.exposure_rows(), filled, strict=True)))

    # -- hand-derived paper-mode steps ---------------------------------------------------
    def pair_terms(
        self, batch: Batch, user_rows: Tensor | None = None, item_rows: Tensor | None = None
    ) -> PairTerms:
        assert batch.items is not None
        if user_rows is None:
            user_rows = self.user_emb.detach().index_select(0, batch.users)
        if item_rows is None:
            item_rows = self.item_emb.detach().index_select(0, batch.items)
        exposure_rows = self.exposure_user_emb.detach().index_select(0, batch.users)
        gate_weight = self.gate_weight.detach()
        # The same operations as `exposure_from_rows`, so m is the same number.
        gate = torch.sigmoid(item_rows @ gate_weight + self.gate_bias.detach()).squeeze(-1)
        personal = torch.sigmoid((exposure_rows * item_rows).sum(-1))
        theta = self.exposure_net.theta.index_select(0, batch.items)
        return PairTerms(
            user_rows,
            item_rows,
            exposure_rows,
            gate_weight.view(1, -1),
            (user_rows * item_rows).sum(-1),
            personal,
            gate,
            theta,
            gate * personal + (1.0 - gate) * theta,
        )

    def exposure_gradients(
        self, terms: PairTerms, coef_e: Tensor, coef_gate: Tensor, users: Tensor
    ) -> list[tuple[Tensor | None, Tensor]]:
        """Per-pair gradient c_e w_i of the exposure user rows and the gate's summed
        gradients (sum c_g w_i, sum c_g), as `RowAdam.step` takes them."""
        return [
            (users, coef_e.unsqueeze(-1) * terms.item_rows),
            (None, (coef_gate @ terms.item_rows).view_as(self.gate_weight)),
            (None, coef_gate.sum().view_as(self.gate_bias)),
        ]

    def train_exposure_gradients(
        self, terms: PairTerms, loss_m: Tensor, users: Tensor
    ) -> list[tuple[Tensor | None, Tensor]]:
        """dL/da from l_m: dm/de_u = r q' w_i, dm/dg = (q - theta) r' w_i and
        dm/db = (q - theta) r'."""
        coef_e = loss_m * terms.gate * terms.personal_slope
        coef_gate = loss_m * (terms.personal - terms.theta) * terms.gate_slope
        return self.exposure_gradients(terms, coef_e, coef_gate, users)

    def relevance_gradients(
        self, terms: PairTerms, loss_s: Tensor, loss_m: Tensor, batch: Batch
    ) -> list[tuple[Tensor | None, Tensor]]:
        """dL/dw_u = l_s w_i; dL/dw_i = l_s w_u, plus l_m dm/dw_i (m depends on w_i, Eq. 13)
        with `item_grad_through_exposure`."""
        assert batch.items is not None
        slope = loss_s.unsqueeze(-1)
        item_grad = slope * terms.user_rows
        if self.hyper.item_grad_through_exposure:
            item_grad = item_grad + loss_m.unsqueeze(-1) * terms.exposure_item_slope()
        return [(batch.users, slope * terms.item_rows), (batch.items, item_grad)]

    def pair_relevance_step(self, batch: Batch) -> Tensor:
        terms = self.pair_terms(batch)
        d = low_variance_derivatives(terms.logits, terms.exposure, batch.labels)
        n = batch.labels.numel()
        self.relevance_optimizer.step(self.relevance_gradients(terms, d.s / n, d.m / n, batch))
        return low_variance_loss(terms.logits, terms.exposure, batch.labels).mean()

    def pair_exposure_step(self, batch: Batch) -> Tensor:
        terms = self.pair_terms(batch)
        d = low_variance_derivatives(terms.logits, terms.exposure, batch.labels)
        n = batch.labels.numel()
        self.exposure_optimizer.step(self.train_exposure_gradients(terms, d.m / n, batch.users))
        return low_variance_loss(terms.logits, terms.exposure, batch.labels).mean()

    def pair_joint_step(self, batch: Batch) -> Tensor:
        terms = self.pair_terms(batch)
        d = low_variance_derivatives(terms.logits, terms.exposure, batch.labels)
        n = batch.labels.numel()
        loss_s, loss_m = d.s / n, d.m / n
        self.relevance_optimizer.step(self.relevance_gradients(terms, loss_s, loss_m, batch))
        self.exposure_optimizer.step(self.train_exposure_gradients(terms, loss_m, batch.users))
        return low_variance_loss(terms.logits, terms.exposure, batch.labels).mean()

    def pair_validation_bilevel_step(self, batch: Batch) -> Tensor:
        """UBO's exposure step with the hypergradient in closed form.

        With G_u = sum l_s w_i and G_i = sum l_s w_u the inner gradients (batch-summed; the
        paper's derivation, Eq. 16-17), w' = w - eta G; A_u, A_i = dL_val/dw'_u, dL_val/dw'_i
        (first order, from the validation pairs at w'). Then dL_val/da = -eta sum over
        training pairs of C dm/da, C = l_sm (A_u . w_i + A_i . w_u) (l_sm: the second
        derivative of L2 in s and m), which for one pair is Eq. 17.

        With `item_grad_through_exposure`, G_i gains l_m dm/dw_i and the hypergradient two
        terms: dL_val/da = -eta sum (C dm/da + l_m dk/da), with k = A_i . dm/dw_i =
        r q' (A_i . e_u) + (q - theta) r' (A_i . g) and C gaining l_mm k. Spelled out, with
        q'' = q'(1 - 2q), r'' = r'(1 - 2r), ae = A_i . e_u, ag = A_i . g:
            dk/de_u = (r q'' ae + r' q' ag) w_i + r q' A_i
            dk/dg   = (r' q' ae + (q - theta) r'' ag) w_i + (q - theta) r' A_i,  dk/db the
                      coefficient of w_i in dk/dg.
        tests/test_bilevel.py checks this step against autograd of the unrolled step and
        finite differences, both ways."""
        assert batch.items is not None
        val_users, val_items, val_labels = self.validation_batch()
        n_train = batch.users.numel()
        user_rows, user_local = unique_rows(
            torch.cat([batch.users, val_users]), self.user_emb.shape[0]
        )
        item_rows, item_local = unique_rows(
            torch.cat([batch.items, val_items]), self.item_emb.shape[0]
        )
        user_values = self.user_emb.detach().index_select(0, user_rows)
        item_values = self.item_emb.detach().index_select(0, item_rows)
        train_user, val_user = user_local[:n_train], user_local[n_train:]
        train_item, val_item = item_local[:n_train], item_local[n_train:]
        terms = self.pair_terms(
            batch, user_values.index_select(0, train_user), item_values.index_select(0, train_item)
        )
        d = low_variance_derivatives(terms.logits, terms.exposure, batch.labels, True)
        assert d.sm is not None and d.mm is not None
        through = self.hyper.item_grad_through_exposure
        loss_s = d.s.unsqueeze(-1)
        item_inner = loss_s * terms.user_rows
        if through:
            item_inner = item_inner + d.m.unsqueeze(-1) * terms.exposure_item_slope()
        eta = self.inner_lr
        user_next = user_values.index_add(0, train_user, loss_s * terms.item_rows, alpha=-eta)
        item_next = item_values.index_add(0, train_item, item_inner, alpha=-eta)
        val_user_rows = user_next.index_select(0, val_user)
        val_item_rows = item_next.index_select(0, val_item)
        val_logits = (val_user_rows * val_item_rows).sum(-1)
        outer_loss = log_loss(val_logits, val_labels).sum()
        residual = (torch.sigmoid(val_logits) - val_labels).unsqueeze(-1)
        adjoint_user = torch.zeros_like(user_values).index_add_(
            0, val_user, residual * val_item_rows
        )
        adjoint_item = torch.zeros_like(item_values).index_add_(
            0, val_item, residual * val_user_rows
        )
        a_user = adjoint_user.index_select(0, train_user)
        a_item = adjoint_item.index_select(0, train_item)

        q, r, gap = terms.personal, terms.gate, terms.personal - terms.theta
        q1, r1 = terms.personal_slope, terms.gate_slope
        coupling = (a_user * terms.item_rows).sum(-1) + (a_item * terms.user_rows).sum(-1)
        c = d.sm * coupling
        if not through:
            coef_e, coef_gate = -eta * c * r * q1, -eta * c * gap * r1
            grads = self.exposure_gradients(terms, coef_e, coef_gate, batch.users)
            self.exposure_optimizer.step(grads)
            return outer_loss
        q2, r2 = q1 * (1.0 - 2.0 * q), r1 * (1.0 - 2.0 * r)
        ae = (a_item * terms.exposure_rows).sum(-1)
        ag = (a_item * terms.gate_weight).sum(-1)
        k = r * q1 * ae + gap * r1 * ag
        c = c + d.mm * k
        lm = d.m
        coef_e = -eta * (c * r * q1 + lm * (r * q2 * ae + r1 * q1 * ag))
        coef_gate = -eta * (c * gap * r1 + lm * (r1 * q1 * ae + gap * r2 * ag))
        grads = self.exposure_gradients(terms, coef_e, coef_gate, batch.users)
        # The A_i terms of dk/de_u and dk/dg (not along w_i).
        along_adjoint = (-eta * lm).unsqueeze(-1) * a_item
        grads[0] = (batch.users, grads[0][1] + (r * q1).unsqueeze(-1) * along_adjoint)
        gate_extra = (gap * r1).unsqueeze(-1) * along_adjoint
        grads[1] = (None, grads[1][1] + gate_extra.sum(0).view_as(self.gate_weight))
        self.exposure_optimizer.step(grads)
        return outer_loss

    # -- hand-derived dense-mode steps -----------------------------------------------------
    def block_terms(self, batch: Batch) -> BlockTerms:
        """The per-cell inputs of L2 with m_a on a block of users against all items. The
        logits U W^T of an exposure-only step (`_keep_logits`) serve the relevance step that
        follows it on the same block (UBO, AlterOpt): that step changed no relevance row, so
        the GEMM would give the same numbers."""
        kept, self._kept_logits = self._kept_logits, None
        # Only the same block's, and only if nothing wrote into them since (a kernel's eager
        # form may overwrite its first argument; the mixed-exposure ones do not).
        user_rows = self.user_emb.detach().index_select(0, batch.users)
        exposure_rows = self.exposure_user_emb.detach().index_select(0, batch.users)
        item_table = self.item_emb.detach()
        if kept is not None and kept[0] is batch and kept[1]._version == kept[2]:
            logits = kept[1]
        else:
            logits = user_rows @ item_table.T
        # The gate as `exposure_from_rows` computes it, so r is the same number.
        gate = torch.sigmoid(item_table @ self.gate_weight.detach() + self.gate_bias.detach())
        return BlockTerms(
            user_rows,
            item_table,
            exposure_rows,
            logits,
            exposure_rows @ item_table.T,
            gate.squeeze(-1),
            self.exposure_net.theta,
            batch.cell_tables(),
        )

    def _keep_logits(self, batch: Batch, terms: BlockTerms) -> None:
        """Hand an exposure-only step's logits to the next `block_terms` on `batch` (the
        kernels read them without writing)."""
        self._kept_logits = (batch, terms.logits, terms.logits._version)

    def block_exposure_gradients(
        self, terms: BlockTerms, coef_e: Tensor, coef_gate: Tensor, users: Tensor
    ) -> list[tuple[Tensor | None, Tensor]]:
        """dL/de_u = sum_i c_e w_i = c_e W; dL/dg = sum_ui c_g w_i = (1^T c_g) W;
        dL/db = sum_ui c_g: the block analogue of `exposure_gradients`."""
        column = coef_gate.sum(0)
        return [
            (users, coef_e @ terms.item_table),
            (None, (column @ terms.item_table).view_as(self.gate_weight)),
            (None, column.sum().view_as(self.gate_bias)),
        ]

    def block_joint_step(self, batch: Batch, relevance: bool, exposure: bool) -> Tensor:
        """The relevance step, AlterOpt's exposure step on L_train, or both at once
        (JointOpt), on a block: with n the block's training cells and l_s, l_m per cell
        (0 on held-out cells), dL/dW_u = (l_s / n) W, dL/dW = (l_s / n)^T U, and the exposure
        gradients of `train_exposure_gradients` summed by GEMMs; every per-cell quantity in
        one fused pass (`fused.mixed_exposure`)."""
        terms = self.block_terms(batch)
        scale = batch.cell_scale(terms.logits.dtype)
        slope, loss, *coefficients = fused.mixed_exposure(*terms.cells(), scale, exposure)
        # Every gradient first: terms.item_table is the live item table, which the relevance
        # update changes in place.
        if exposure:
            coef_e, coef_gate = coefficients
            exposure_grads = self.block_exposure_gradients(terms, coef_e, coef_gate, batch.users)
        if relevance:
            self.relevance_optimizer.step(
                [(batch.users, slope @ terms.item_table), (None, slope.T @ terms.user_rows)]
            )
        if exposure:
            self.exposure_optimizer.step(exposure_grads)
        if not relevance:
            self._keep_logits(batch, terms)
        return loss

    def block_validation_bilevel_step(self, batch: Batch) -> Tensor:
        """UBO's exposure step on a block, the hypergradient in closed form as in
        `pair_validation_bilevel_step` (Eq. 16-17): G_U = (l_s w) W and G_W = (l_s w)^T U
        summed over the block's training cells (w the cell weight), w' = w - eta G at the
        validation pairs (a validation user outside the block keeps its row), A_U and A_W the
        validation loss's gradients at w', and
            dL_val/da = -eta sum_ui w l_sm (A_u . w_i + A_i . w_u) dm/da,
        the coupling matrix A_U W^T + U A_W^T being one GEMM more than the relevance step's."""
        val_users, val_items, val_labels = self.validation_batch()
        terms = self.block_terms(batch)
        eta, block = self.inner_lr, batch.users.numel()
        slope = fused.mixed_slope(*terms.cells())
        grad_user = slope @ terms.item_table
        grad_item = slope.T @ terms.user_rows
        # Each validation user's row in the block, or the zero row `block` past its end.
        position = torch.full_like(self.user_emb[:, 0], block, dtype=torch.long)
        position.index_copy_(0, batch.users, torch.arange(block, device=self.device))
        in_block = position.index_select(0, val_users)
        grad_user = torch.cat([grad_user, grad_user.new_zeros(1, grad_user.shape[1])])
        val_user_rows = self.user_emb.detach().index_select(0, val_users)
        val_user_rows = val_user_rows - eta * grad_user.index_select(0, in_block)
        val_item_rows = terms.item_table.index_select(0, val_items)
        val_item_rows = val_item_rows - eta * grad_item.index_select(0, val_items)
        val_logits = (val_user_rows * val_item_rows).sum(-1)
        outer_loss = log_loss(val_logits, val_labels).sum()
        residual = (torch.sigmoid(val_logits) - val_labels).unsqueeze(-1)
        adjoint_user = grad_user.new_zeros(block + 1, grad_user.shape[1])
        adjoint_user.index_add_(0, in_block, residual * val_item_rows)
        adjoint_item = torch.zeros_like(terms.item_table)
        adjoint_item.index_add_(0, val_items, residual * val_user_rows)
        coupling = (
            torch.cat([adjoint_user[:block], terms.user_rows], 1)
            @ torch.cat([terms.item_table, adjoint_item], 1).T
        )
        neg_eta = torch.tensor(-eta, dtype=terms.logits.dtype, device=self.device)
        coef_e, coef_gate = fused.mixed_hyper_coefficients(coupling, *terms.cells(), neg_eta)
        self.exposure_optimizer.step(
            self.block_exposure_gradients(terms, coef_e, coef_gate, batch.users)
        )
        self._keep_logits(batch, terms)
        return outer_loss

    # -- the interface ---------------------------------------------------------------------
    def scores(self, users: Tensor) -> Tensor:
        return self.relevance.logits(users, None)

    def exposure(self, users: Tensor) -> Tensor:
        return self.exposure_net(self.item_emb, users, None)

    def state(self) -> dict[str, Tensor]:
        names = ("user_emb", "item_emb", "exposure_user_emb", "gate_weight", "gate_bias")
        return {name: getattr(self, name).detach() for name in names}
