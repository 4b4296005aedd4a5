"""The one interface every method implements, and the parts they share.

A method owns its parameters and optimisers and implements one update (`step`) on a batch
the trainer's sampler draws; the trainer owns the loop, seeding, device, evaluation and
progress. `scores` gives relevance logits (ranking uses their order), `exposure` the method's
exposure estimate m_bar where it has one (for PCC on semi-synthetic data).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ubo_core import fused
from ubo_core.config import TrainConfig
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.estimators import item_popularity_exposure


@dataclass(frozen=True)
class NoHyper:
    """For methods without knobs of their own."""


class Method(ABC):
    """Base class of every method (ubo_core/methods/__init__.py registers them).

    sampling: which sampler feeds `step` — "pointwise" (pairs in paper mode, user blocks in
    dense mode), "triples" (BPR) or "full" (one step per epoch on everything: EM methods).
    display: the name tables and figures give it; by default the class name.
    """

    Hyper: ClassVar[type] = NoHyper
    sampling: ClassVar[str] = "pointwise"
    display: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("display"):
            cls.display = cls.__name__

    def __init__(
        self, tensors: TrainingTensors, train: TrainConfig, hyper: Any, generator: torch.Generator
    ) -> None:
        self.tensors, self.train, self.hyper, self.generator = tensors, train, hyper, generator
        self.device = tensors.device
        fused.configure(train.elementwise, tensors.device)

    @abstractmethod
    def step(self, batch: Batch) -> dict[str, Tensor]:
        """One update; returns named losses as 0-d tensors (no host sync)."""

    @abstractmethod
    def scores(self, users: Tensor) -> Tensor:
        """Relevance logits of `users` (B,) against all items, (B, M)."""

    def exposure(self, users: Tensor) -> Tensor | None:
        """Exposure estimate m_bar of `users` against all items, (B, M), or None."""
        return None

    @abstractmethod
    def state(self) -> dict[str, Tensor]:
        """The trained parameters, enough to rebuild `scores` and `exposure`."""

    def load_state(self, state: dict[str, Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).data.copy_(value.to(self.device))


def embedding(
    rows: int, dim: int, std: float, generator: torch.Generator, device: torch.device
) -> nn.Parameter:
    """N(0, std^2) initialised embedding table, drawn from the method's seeded generator."""
    values = torch.randn(rows, dim, generator=generator, device=device) * std
    return nn.Parameter(values)


def pair_dot(left: Tensor, right: Tensor, users: Tensor, items: Tensor | None) -> Tensor:
    """w_u . w_i for pairs (items (B,) -> (B,)) or against all items (items None -> (B, M))."""
    user_rows = left.index_select(0, users)
    if items is None:
        return user_rows @ right.T
    return (user_rows * right.index_select(0, items)).sum(-1)


def gather_items(values: Tensor, items: Tensor | None) -> Tensor:
    """Per-item values for the batch: (M,) broadcast over a block, or (B,) for pairs."""
    return values if items is None else values.index_select(0, items)


def popularity_exposure(tensors: TrainingTensors) -> Tensor:
    """theta_i (Eq. 12) in torch's default dtype (float32; float64 in the tests that
    compare the hand-derived steps with autograd to rounding) on the device."""
    return item_popularity_exposure(tensors.item_popularity).to(torch.get_default_dtype())


class RelevanceMF:
    """p_ui = sigmoid(w_u . w_i): the relevance model of every MF method (no biases)."""

    def __init__(self, tensors: TrainingTensors, train: TrainConfig, generator: torch.Generator):
        self.user_emb = embedding(
            tensors.n_users, train.dim, train.init_std, generator, tensors.device
        )
        self.item_emb = embedding(
            tensors.n_items, train.dim, train.init_std, generator, tensors.device
        )

    def parameters(self) -> list[nn.Parameter]:
        return [self.user_emb, self.item_emb]

    def logits(self, users: Tensor, items: Tensor | None) -> Tensor:
        return pair_dot(self.user_emb, self.item_emb, users, items)


class ExposureNet:
    """m_a(u, i) = r(w_i) sigmoid(e_u . w_i) + (1 - r(w_i)) theta_i, r = sigmoid(Linear(w_i))
    (Eq. 13). a = {e_u, Linear}; w_i is the relevance item embedding, passed in so that the
    bi-level step can evaluate m_a at updated item embeddings."""

    def __init__(self, tensors: TrainingTensors, train: TrainConfig, generator: torch.Generator):
        device = tensors.device
        self.user_emb = embedding(tensors.n_users, train.dim, train.init_std, generator, device)
        self.gate_weight = embedding(train.dim, 1, train.init_std, generator, device)
        self.gate_bias = nn.Parameter(torch.zeros(1, device=device))
        self.theta = popularity_exposure(tensors)

    def parameters(self) -> list[nn.Parameter]:
        return [self.user_emb, self.gate_weight, self.gate_bias]

    def __call__(self, item_emb: Tensor, users: Tensor, items: Tensor | None) -> Tensor:
        item_rows = item_emb if items is None else item_emb.index_select(0, items)
        return exposure_from_rows(
            self.user_emb.index_select(0, users),
            item_rows,
            self.gate_weight,
            self.gate_bias,
            gather_items(self.theta, items),
            pairs=items is not None,
        )


def exposure_from_rows(
    exposure_user_rows: Tensor,
    item_rows: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    theta: Tensor,
    pairs: bool,
) -> Tensor:
    """Eq. 13 on gathered rows: e_u (B, d), w_i (B, d) for pairs or (M, d) against all items,
    theta (B,) or (M,). Returns m_a, (B,) or (B, M)."""
    gate = torch.sigmoid(item_rows @ gate_weight + gate_bias).squeeze(-1)
    if pairs:
        personal = torch.sigmoid((exposure_user_rows * item_rows).sum(-1))
    else:
        personal = torch.sigmoid(exposure_user_rows @ item_rows.T)
    return gate * personal + (1.0 - gate) * theta


def row_logits(user_rows: Tensor, item_rows: Tensor, pairs: bool) -> Tensor:
    """w_u . w_i on gathered rows: (B,) for pairs, (B, M) against all items."""
    return (user_rows * item_rows).sum(-1) if pairs else user_rows @ item_rows.T


def adam(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Adam:
    # fused: one kernel for the whole group's update (p, g, m, v read once), with the step
    # count kept on the parameters' device, so a step reads nothing back to the host.
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
