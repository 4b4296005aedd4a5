"""RelMF (Saito et al. 2020): the IPS estimator L1 (Eq. 4) with item popularity theta_i as
exposure, clipped from below at `clip` to bound the 1/m variance (Eq. 6)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ubo_core import fused
from ubo_core.errors import ConfigError
from ubo_core.estimators import ips_loss, ips_loss_slope
from ubo_core.methods.base import popularity_exposure
from ubo_core.methods.pointwise import FixedExposureMF


@dataclass(frozen=True)
class RelMFHyper:
    clip: float = 0.1  # exposure floor; tuned on the hyper-validation set

    def __post_init__(self) -> None:
        if not 0.0 < self.clip <= 1.0:
            raise ConfigError("clip", f"{self.clip!r} is out of range (0, 1]")


class RelMF(FixedExposureMF):
    Hyper = RelMFHyper
    loss = staticmethod(ips_loss)
    loss_slope = staticmethod(ips_loss_slope)
    block_slope_loss = staticmethod(fused.ips)

    def fixed_exposure(self) -> Tensor:
        return popularity_exposure(self.tensors).clamp_min(self.hyper.clip)
