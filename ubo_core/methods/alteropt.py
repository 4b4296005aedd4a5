"""AlterOpt (ablation, RQ2): alternating steps, first a then w, both on the training loss L2."""

from __future__ import annotations

from torch import Tensor

from ubo_core.engine import Batch
from ubo_core.methods.exposure_mf import ExposureMF


class AlterOpt(ExposureMF):
    def step(self, batch: Batch) -> dict[str, Tensor]:
        self.exposure_step_on_train(batch)
        return {"train_loss": self.relevance_step(batch)}
