"""JointOpt (ablation, RQ2): w and a minimised together on the training loss L2."""

from __future__ import annotations

from torch import Tensor

from ubo_core.engine import Batch
from ubo_core.methods.exposure_mf import ExposureMF


class JointOpt(ExposureMF):
    def step(self, batch: Batch) -> dict[str, Tensor]:
        return {"train_loss": self.joint_step(batch)}
