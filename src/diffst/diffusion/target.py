"""What the diffusion generates, given the LR condition.

``"hr"``: the HR maps themselves (the paper's formulation). ``"residual"``: the HR maps minus the LR
maps interpolated onto the HR grid, halved so it stays in [-1, 1] (as SRDiff does). Both live in the
normaliser's model space and both keep LR as a model input; the residual only changes the target.

Why residual is the default: sparse counts put most HR bins at the bottom of the model range (the
mean of the maps is about -0.6), and an epsilon-predicting model has to estimate that offset from an
almost pure-noise input at large t, which takes far more training than a CPU run affords; samplers
then drift towards 0 and return noise. The residual is centred, and an untrained model returns the
interpolation of LR instead of noise.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

TargetKind = Literal["hr", "residual"]


def lr_on_hr_grid(lr: Tensor, hr_shape: tuple[int, int]) -> Tensor:
    """Bicubic interpolation of (B, N, h, w) model-space LR maps onto the (H, W) HR grid."""
    return F.interpolate(lr, size=tuple(hr_shape), mode="bicubic", align_corners=False)


def encode_target(hr: Tensor, lr: Tensor, kind: TargetKind) -> Tensor:
    """Model-space HR maps -> the diffusion's x0."""
    if kind == "hr":
        return hr
    return (hr - lr_on_hr_grid(lr, hr.shape[-2:])) / 2.0


def decode_target(x0: Tensor, lr: Tensor, kind: TargetKind) -> Tensor:
    """Turn the diffusion's x0 back into model-space HR maps."""
    if kind == "hr":
        return x0
    return 2.0 * x0 + lr_on_hr_grid(lr.to(x0.dtype), x0.shape[-2:])


__all__ = ["TargetKind", "decode_target", "encode_target", "lr_on_hr_grid"]
