"""UMF: the paper's low-variance estimator L2 (Eq. 10) with item popularity as exposure
(theta_i, Eq. 12, fixed): RelMF's exposure with UBO's estimator."""

from __future__ import annotations

from torch import Tensor

from ubo_core import fused
from ubo_core.estimators import low_variance_loss, low_variance_slope
from ubo_core.methods.base import popularity_exposure
from ubo_core.methods.pointwise import FixedExposureMF


class UMF(FixedExposureMF):
    loss = staticmethod(low_variance_loss)
    loss_slope = staticmethod(low_variance_slope)
    block_slope_loss = staticmethod(fused.low_variance)

    def fixed_exposure(self) -> Tensor:
        # theta_i = 0 for items without a training positive would make log(m p) = -inf on a
        # label that is always 0 there, harmless; keep them at the smallest positive theta.
        theta = popularity_exposure(self.tensors)
        return theta.clamp_min(float(theta[theta > 0].min()))
