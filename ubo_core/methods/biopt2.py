"""BiOpt2 (ablation, RQ2): bi-level like UBO but with the training batch as its own
"validation" set; exposure there cannot be taken as 1, so the outer loss is L2 with m_bar."""

from __future__ import annotations

from torch import Tensor

from ubo_core.engine import Batch
from ubo_core.methods.exposure_mf import ExposureMF, StepRows


class BiOpt2(ExposureMF):
    def step(self, batch: Batch) -> dict[str, Tensor]:
        outer_loss = self.bilevel_exposure_step(batch, self.batch_outer, with_validation=False)
        return {"train_loss": self.relevance_step(batch), "outer_loss": outer_loss}

    def batch_outer(
        self, user_next: Tensor, item_next: Tensor, rows: StepRows, batch: Batch
    ) -> Tensor:
        # L2 at w' with m_bar = m_a (a's direct term and its effect through w' both count).
        return self.rows_loss(user_next, item_next, rows, batch, "sum")
