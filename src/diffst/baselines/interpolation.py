"""Interpolation of LR maps onto the HR grid: the simple baseline every result is read against."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def interpolate_lr(lr_counts: np.ndarray, hr_shape: tuple[int, int], scale: int, mode: str = "bicubic") -> np.ndarray:
    """Upsample LR counts (..., N, h, w) to HR counts per bin (..., N, H, W).

    LR bins hold s x s HR bins, so the LR values are first spread evenly (divided by s²), then
    interpolated (``bicubic``, ``bilinear`` or ``nearest``) and clipped at zero: bicubic overshoots.
    """
    lr = torch.from_numpy(np.array(lr_counts, dtype=np.float32)) / float(scale * scale)
    lead = lr.shape[:-3]
    flat = lr.reshape(-1, *lr.shape[-3:])
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(flat, size=tuple(hr_shape), mode=mode, **kwargs).clamp_min(0.0)
    return up.reshape(*lead, lr.shape[-3], *hr_shape).numpy()
