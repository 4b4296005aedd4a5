"""NoOpt (control, RQ2): UBO with the exposure parameters a frozen at their initial values.

Only the relevance step runs: w is fitted on L2 with a fixed, random m_a (Eq. 13 at
initialisation, still a function of the moving w_i). Beside UBO, JointOpt, AlterOpt and
BiOpt2 it shows what optimising a at all, and UBO's bi-level step in particular, adds over
not optimising it."""

from __future__ import annotations

from torch import Tensor

from ubo_core.engine import Batch
from ubo_core.methods.exposure_mf import ExposureMF


class NoOpt(ExposureMF):
    def step(self, batch: Batch) -> dict[str, Tensor]:
        return {"train_loss": self.relevance_step(batch)}
