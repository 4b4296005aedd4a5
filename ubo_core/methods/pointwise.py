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


class FixedExposureMF(Method):
    """Subclasses set `loss` (per pair: logits, exposure, labels) and `fixed_exposure`."""

    loss: Loss

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
        users = RowSubset(self.user_emb, batch.users)
        items = RowSubset(self.item_emb, batch.items)
        pairs = batch.items is not None
        logits = row_logits(users.gather(), items.gather(), pairs)
        exposure = gather_items(self.item_exposure, batch.items)
        loss = batch.reduce_mean(type(self).loss(logits, exposure, batch.labels))
        grad_users, grad_items = torch.autograd.grad(loss, [users.values, items.values])
        self.optimizer.step([(users.rows, grad_users), (items.rows, grad_items)])
        return {"train_loss": loss.detach()}

    def scores(self, users: Tensor) -> Tensor:
        return self.relevance.logits(users, None)

    def exposure(self, users: Tensor) -> Tensor:
        return self.item_exposure.expand(users.numel(), -1)

    def state(self) -> dict[str, Tensor]:
        return {"user_emb": self.user_emb.detach(), "item_emb": self.item_emb.detach()}
