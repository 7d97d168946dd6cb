"""What the diffusion generates, given the LR condition.

``"hr"``: the HR maps themselves (the paper's formulation). ``"residual"``: the HR maps minus the LR
maps interpolated onto the HR grid, halved so it stays in [-1, 1] (as SRDiff does). Both live in the
normaliser's model space and both keep LR as a model input; the residual only changes the target.

Why residual is the default: sparse counts put most HR bins at the bottom of the model range (the
mean of the maps is about -0.6), and an epsilon-predicting model has to estimate that offset from an
almost pure-noise input at large t, which takes far more training than a CPU run affords; samplers
then drift towards 0 and return noise. The residual is centred, and an untrained model returns the
interpolation of LR instead of noise.

``"regression_residual"``: the HR maps minus the prediction of a frozen regression run (the base),
halved like the residual (CorrDiff's two stages, Mardani et al. 2023, arXiv 2309.15214). The base's
model-space prediction is passed as ``base``; an untrained diffusion then returns the regression.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

TargetKind = Literal["hr", "residual", "regression_residual"]


def lr_on_hr_grid(lr: Tensor, hr_shape: tuple[int, int]) -> Tensor:
    """Bicubic interpolation of (B, N, h, w) model-space LR maps onto the (H, W) HR grid."""
    return F.interpolate(lr, size=tuple(hr_shape), mode="bicubic", align_corners=False)


def _need_base(kind: TargetKind, base: Tensor | None) -> Tensor:
    if base is None:
        raise ValueError(f"target {kind!r} needs the base run's prediction (base=...)")
    return base


def encode_target(hr: Tensor, lr: Tensor, kind: TargetKind, base: Tensor | None = None) -> Tensor:
    """Model-space HR maps -> the diffusion's x0.

    ``base`` is the base run's model-space HR prediction (``"regression_residual"`` only).
    """
    if kind == "hr":
        return hr
    if kind == "regression_residual":
        return (hr - _need_base(kind, base).to(hr.dtype)) / 2.0
    return (hr - lr_on_hr_grid(lr, hr.shape[-2:])) / 2.0


def decode_target(x0: Tensor, lr: Tensor, kind: TargetKind, base: Tensor | None = None) -> Tensor:
    """Turn the diffusion's x0 back into model-space HR maps (``base``: as for :func:`encode_target`)."""
    if kind == "hr":
        return x0
    if kind == "regression_residual":
        return 2.0 * x0 + _need_base(kind, base).to(x0.dtype)
    return 2.0 * x0 + lr_on_hr_grid(lr.to(x0.dtype), x0.shape[-2:])


__all__ = ["TargetKind", "decode_target", "encode_target", "lr_on_hr_grid"]
