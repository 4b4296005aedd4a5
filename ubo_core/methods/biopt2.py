"""BiOpt2 (ablation, RQ2): bi-level like UBO but with the training batch as its own
"validation" set; exposure there cannot be taken as 1, so the outer loss is L2 with m_bar."""

from __future__ import annotations

from torch import Tensor

from ubo_core.engine import Batch
from ubo_core.methods.exposure_mf import ExposureMF


class BiOpt2(ExposureMF):
    name = "biopt2"

    def step(self, batch: Batch) -> dict[str, Tensor]:
        outer_loss = self.bilevel_exposure_step(batch, self.batch_outer)
        return {"train_loss": self.relevance_step(batch), "outer_loss": outer_loss}

    def batch_outer(self, user_next: Tensor, item_next: Tensor, batch: Batch) -> Tensor:
        return self.train_loss(user_next, item_next, batch, "sum")
