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
from ubo_core.methods.base import ExposureNet, Method, RelevanceMF, adam, pair_dot


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


OuterLoss = Callable[[Tensor, Tensor, Batch], Tensor]


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
        self.relevance_optimizer = adam(
            self.relevance.parameters(), train.step_lr, train.weight_decay
        )
        self.exposure_optimizer = adam(
            self.exposure_net.parameters(), exposure_lr, hyper.exposure_weight_decay
        )

    # -- the training loss L2 with m_a, for given relevance embeddings -------------------
    def train_loss(self, user_emb: Tensor, item_emb: Tensor, batch: Batch, reduce: str) -> Tensor:
        logits = pair_dot(user_emb, item_emb, batch.users, batch.items)
        exposure = self.exposure_net(item_emb, batch.users, batch.items)
        per_pair = low_variance_loss(logits, exposure, batch.labels)
        return batch.reduce_mean(per_pair) if reduce == "mean" else batch.reduce_sum(per_pair)

    # -- update rules the four methods compose -------------------------------------------
    def relevance_step(self, batch: Batch) -> Tensor:
        """Adam step of w on L_train(w, a) with a held fixed."""
        loss = self.train_loss(self.user_emb, self.item_emb, batch, "mean")
        self.relevance_optimizer.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(loss, self.relevance.parameters())
        for param, grad in zip(self.relevance.parameters(), grads, strict=True):
            param.grad = grad
        self.relevance_optimizer.step()
        return loss.detach()

    def exposure_step_on_train(self, batch: Batch) -> Tensor:
        """Adam step of a on L_train(w, a) with w held fixed (AlterOpt)."""
        loss = self.train_loss(self.user_emb.detach(), self.item_emb.detach(), batch, "mean")
        self._apply_exposure_gradient(torch.autograd.grad(loss, self.exposure_net.parameters()))
        return loss.detach()

    def joint_step(self, batch: Batch) -> Tensor:
        """One Adam step of w and a together on L_train(w, a) (JointOpt)."""
        loss = self.train_loss(self.user_emb, self.item_emb, batch, "mean")
        params = self.relevance.parameters() + self.exposure_net.parameters()
        grads = torch.autograd.grad(loss, params)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        self.relevance_optimizer.step()
        self.exposure_optimizer.step()
        return loss.detach()

    def bilevel_exposure_step(self, batch: Batch, outer: OuterLoss) -> Tensor:
        """Adam step of a on the hypergradient d outer(w'(a)) / da, w' = w - eta dL/dw."""
        inner = self.train_loss(self.user_emb, self.item_emb, batch, "sum")
        grad_user, grad_item = torch.autograd.grad(
            inner, self.relevance.parameters(), create_graph=True
        )
        user_next = self.user_emb - self.inner_lr * grad_user
        item_next = self.item_emb - self.inner_lr * grad_item
        outer_loss = outer(user_next, item_next, batch)
        hypergrad = torch.autograd.grad(
            outer_loss, self.exposure_net.parameters(), allow_unused=True
        )
        self._apply_exposure_gradient(hypergrad)
        return outer_loss.detach()

    def validation_outer(self, user_next: Tensor, item_next: Tensor, batch: Batch) -> Tensor:
        """UBO's outer loss: log loss of p' on (a batch of) the unbiased validation set, m = 1."""
        users, items, labels = self.validation_batch()
        return log_loss(pair_dot(user_next, item_next, users, items), labels).sum()

    def validation_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        t = self.tensors
        size = self.train.val_batch_size
        if t.val_users.numel() <= size:
            return t.val_users, t.val_items, t.val_labels
        pick = torch.randint(
            t.val_users.numel(), (size,), generator=self.generator, device=self.device
        )
        return t.val_users[pick], t.val_items[pick], t.val_labels[pick]

    def _apply_exposure_gradient(self, grads: tuple[Tensor | None, ...]) -> None:
        for param, grad in zip(self.exposure_net.parameters(), grads, strict=True):
            param.grad = torch.zeros_like(param) if grad is None else grad
        self.exposure_optimizer.step()

    # -- the interface ---------------------------------------------------------------------
    def scores(self, users: Tensor) -> Tensor:
        return self.relevance.logits(users, None)

    def exposure(self, users: Tensor) -> Tensor:
        return self.exposure_net(self.item_emb, users, None)

    def state(self) -> dict[str, Tensor]:
        names = ("user_emb", "item_emb", "exposure_user_emb", "gate_weight", "gate_bias")
        return {name: getattr(self, name).detach() for name in names}
