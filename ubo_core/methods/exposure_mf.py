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

from ubo_core.config import TrainConfig
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.errors import ConfigError
from ubo_core.estimators import log_loss, low_variance_loss
from ubo_core.methods.base import (
    ExposureNet,
    Method,
    RelevanceMF,
    exposure_from_rows,
    gather_items,
    pair_dot,
    row_logits,
)
from ubo_core.methods.rows import RowAdam, RowSubset


@dataclass(frozen=True)
class ExposureHyper:
    exposure_lr: float = 1e-3  # eta': Adam learning rate of a, paper mode
    dense_exposure_lr: float = 1e-2  # the same in dense mode (larger batches)
    exposure_weight_decay: float = 0.0
    inner_lr: float = 0.1  # eta of the unrolled step (Eq. 15), paper mode
    dense_inner_lr: float = 1e-3  # the same in dense mode

    def __post_init__(self) -> None:
        for key in ("exposure_lr", "dense_exposure_lr", "inner_lr", "dense_inner_lr"):
            if not 0.0 < getattr(self, key) <= 100.0:
                raise ConfigError(key, f"{getattr(self, key)!r} is out of range (0, 100]")
        if self.exposure_weight_decay < 0:
            raise ConfigError("exposure_weight_decay", "must be >= 0")


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
        paper = train.mode == "paper"
        self.inner_lr = hyper.inner_lr if paper else hyper.dense_inner_lr
        exposure_lr = hyper.exposure_lr if paper else hyper.dense_exposure_lr
        lazy = train.optimizer == "lazy_adam"
        self.relevance_optimizer = RowAdam(
            self.relevance.parameters(), train.step_lr, train.weight_decay, lazy
        )
        self.exposure_optimizer = RowAdam(
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
            item_rows,
            rows.gate_weight,
            rows.gate_bias,
            gather_items(self.exposure_net.theta, batch.items),
            pairs,
        )
        per_pair = low_variance_loss(
            row_logits(user_rows, item_rows, pairs), exposure, batch.labels
        )
        return batch.reduce_mean(per_pair) if reduce == "mean" else batch.reduce_sum(per_pair)

    def train_loss(self, user_emb: Tensor, item_emb: Tensor, batch: Batch, reduce: str) -> Tensor:
        """Reference form on whole tables (tests compare the row-restricted steps with it)."""
        logits = pair_dot(user_emb, item_emb, batch.users, batch.items)
        exposure = self.exposure_net(item_emb, batch.users, batch.items)
        per_pair = low_variance_loss(logits, exposure, batch.labels)
        return batch.reduce_mean(per_pair) if reduce == "mean" else batch.reduce_sum(per_pair)

    # -- update rules the four methods compose -------------------------------------------
    def relevance_step(self, batch: Batch) -> Tensor:
        """Adam step of w on L_train(w, a) with a held fixed."""
        rows = self.rows(batch)
        loss = self.rows_loss(rows.users.values, rows.items.values, rows, batch, "mean")
        grads = torch.autograd.grad(loss, [rows.users.values, rows.items.values])
        self.relevance_optimizer.step([(rows.users.rows, grads[0]), (rows.items.rows, grads[1])])
        return loss.detach()

    def exposure_step_on_train(self, batch: Batch) -> Tensor:
        """Adam step of a on L_train(w, a) with w held fixed (AlterOpt)."""
        rows = self.rows(batch)
        loss = self.rows_loss(
            rows.users.values.detach(), rows.items.values.detach(), rows, batch, "mean"
        )
        self._exposure_update(rows, torch.autograd.grad(loss, rows.exposure_leaves()))
        return loss.detach()

    def joint_step(self, batch: Batch) -> Tensor:
        """One Adam step of w and a together on L_train(w, a) (JointOpt)."""
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

    # -- the interface ---------------------------------------------------------------------
    def scores(self, users: Tensor) -> Tensor:
        return self.relevance.logits(users, None)

    def exposure(self, users: Tensor) -> Tensor:
        return self.exposure_net(self.item_emb, users, None)

    def state(self) -> dict[str, Tensor]:
        names = ("user_emb", "item_emb", "exposure_user_emb", "gate_weight", "gate_bias")
        return {name: getattr(self, name).detach() for name in names}
