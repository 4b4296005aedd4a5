"""UBO: L2 + m_a with the exposure parameters learnt by bi-level optimisation on the unbiased
validation set (the paper's method): a is updated on the validation log loss of the relevance
model after one unrolled training step, then w takes its ordinary step."""

from __future__ import annotations

from torch import Tensor

from ubo_core.engine import Batch
from ubo_core.methods.exposure_mf import ExposureMF


class UBO(ExposureMF):
    def step(self, batch: Batch) -> dict[str, Tensor]:
        val_loss = self.validation_bilevel_step(batch)
        train_loss = self.relevance_step(batch)
        return {"train_loss": train_loss, "outer_loss": val_loss}
