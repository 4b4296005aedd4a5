"""Relevance MF trained pointwise with a fixed exposure estimate (shared by UMF and RelMF)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ubo_core.config import TrainConfig
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.methods.base import Method, RelevanceMF, gather_items, row_logits
from ubo_core.methods.rows import RowAdam, RowSubset

Loss = Callable[[Tensor, Tensor, Tensor], Tensor]
BlockSlopeLoss = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class FixedExposureMF(Method):
    """Subclasses set `loss` (per pair: logits, exposure, labels) and `fixed_exposure`."""

    loss: Loss
    loss_slope: Loss  # d loss / d logit per pair, in closed form (paper mode's fast step)
    # (slopes, loss) of a dense block in one fused pass (ubo_core/fused.py); None: from
    # `loss_slope` and `loss`.
    block_slope_loss: BlockSlopeLoss | None = None
    hand_derived = True  # False: both modes through autograd (the reference, for tests)

    def __init__(
        self, tensors: TrainingTensors, train: TrainConfig, hyper: Any, generator: torch.Generator
    ) -> None:
        super().__init__(tensors, train, hyper, generator)
        self.relevance = RelevanceMF(tensors, train, generator)
        self.user_emb, self.item_emb = self.relevance.user_emb, self.relevance.item_emb
        self.item_exposure = self.fixed_exposure()
        self.optimizer = RowAdam(
            self.relevance.parameters(),
            train.step_lr,
            train.weight_decay,
            lazy=train.optimizer == "lazy_adam",
        )

    def fixed_exposure(self) -> Tensor:
        """Per-item exposure m_bar_i, (M,)."""
        raise NotImplementedError

    def step(self, batch: Batch) -> dict[str, Tensor]:
        if self.hand_derived:
            return self.pair_step(batch) if batch.items is not None else self.block_step(batch)
        users = RowSubset(self.user_emb, batch.users)
        items = RowSubset(self.item_emb, batch.items)
        pairs = batch.items is not None
        logits = row_logits(users.gather(), items.gather(), pairs)
        exposure = gather_items(self.item_exposure, batch.items)
        loss = batch.reduce_mean(type(self).loss(logits, exposure, batch.labels))
        grad_users, grad_items = torch.autograd.grad(loss, [users.values, items.values])
        self.optimizer.step([(users.rows, grad_users), (items.rows, grad_items)])
        return {"train_loss": loss.detach()}

    def pair_step(self, batch: Batch) -> dict[str, Tensor]:
        """Paper mode with the gradient in closed form: dloss/dw_u = l_s w_i and
        dloss/dw_i = l_s w_u per pair (l_s = dloss/ds from `loss_slope`), so no autograd
        graph is built; equal to the autograd step up to rounding (tests)."""
        assert batch.items is not None
        user_rows = self.user_emb.detach().index_select(0, batch.users)
        item_rows = self.item_emb.detach().index_select(0, batch.items)
        logits = (user_rows * item_rows).sum(-1)
        exposure = self.item_exposure.index_select(0, batch.items)
        slope = type(self).loss_slope(logits, exposure, batch.labels) / batch.labels.numel()
        slope = slope.unsqueeze(-1)
        self.optimizer.step([(batch.users, slope * item_rows), (batch.items, slope * user_rows)])
        loss = type(self).loss(logits, exposure, batch.labels).mean()
        return {"train_loss": loss}

    def block_step(self, batch: Batch) -> dict[str, Tensor]:
        """Dense mode with the gradient in closed form: with S the (B, M) matrix of slopes
        l_s / n over the block's training cells (0 on held-out ones, n of them), the user rows
        get S W and the item table S^T U. Three GEMMs and one fused elementwise pass over the
        block (`block_slope_loss`), where autograd's chain of the loss's operations took ~80% of
        the time."""
        user_rows = self.user_emb.detach().index_select(0, batch.users)
        item_table = self.item_emb.detach()
        logits = user_rows @ item_table.T
        scale = batch.cell_scale(logits.dtype)
        cls = type(self)
        if cls.block_slope_loss is not None:
            slope, loss = cls.block_slope_loss(
                logits, self.item_exposure, *batch.cell_tables(), scale
            )
        else:
            assert batch.weight is not None
            slope = cls.loss_slope(logits, self.item_exposure, batch.labels) * batch.weight * scale
            loss = (cls.loss(logits, self.item_exposure, batch.labels) * batch.weight).sum() * scale
        self.optimizer.step([(batch.users, slope @ item_table), (None, slope.T @ user_rows)])
        return {"train_loss": loss}

    def scores(self, users: Tensor) -> Tensor:
        return self.relevance.logits(users, None)

    def exposure(self, users: Tensor) -> Tensor:
        return self.item_exposure.expand(users.numel(), -1)

    def state(self) -> dict[str, Tensor]:
        return {"user_emb": self.user_emb.detach(), "item_emb": self.item_emb.detach()}
