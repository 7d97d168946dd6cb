"""Spot consistency: every s x s block of a super-resolved map adds up to the LR count measured there.

Two forms: :func:`project_to_spots` rescales finished HR counts (any method's, numpy), and
:func:`share_out_spots` builds HR counts from log-weights (torch, differentiable), the output layer of a
spot-ratio regression: the model only says where inside a spot the spot's counts go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["project_to_spots", "share_out_spots"]


def project_to_spots(hr_counts: np.ndarray, lr_counts: np.ndarray, scale: int,
                     lr_mask: np.ndarray | None = None) -> np.ndarray:
    """Rescale each s x s block of HR counts so that it sums to its measured LR count.

    A block whose prediction sums to zero while its LR bin holds counts receives the LR count spread
    evenly. Blocks of unmeasured LR bins (``lr_mask`` False) are left as they are. The shape of the
    expression inside a block is kept; only its total changes, so the result is what the prediction
    says about where, and what the spots say about how much.

    Parameters
    ----------
    hr_counts
        (..., N, H, W) non-negative HR counts per bin (a point estimate or samples), H = s * h.
    lr_counts
        (..., N, h, w) measured LR counts, broadcastable against the blocks of ``hr_counts``.
    scale
        Super-resolution factor s.
    lr_mask
        Optional (..., h, w) boolean mask of measured LR bins.

    Returns
    -------
    np.ndarray
        Float32 HR counts of the same shape whose blocks sum to the LR counts where measured.
    """
    hr = np.asarray(hr_counts, dtype=np.float64)
    lr = np.asarray(lr_counts, dtype=np.float64)
    *lead, rows, cols = hr.shape
    if rows % scale or cols % scale or lr.shape[-2:] != (rows // scale, cols // scale):
        raise ValueError(f"HR maps {rows} x {cols} do not split into s = {scale} blocks matching LR {lr.shape[-2:]}")
    if (hr < 0).any() or (lr < 0).any():
        raise ValueError("spot consistency needs non-negative counts")
    blocks = hr.reshape(*lead, rows // scale, scale, cols // scale, scale)
    sums = blocks.sum(axis=(-3, -1), keepdims=True)
    target = lr[..., :, None, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(sums > 0, blocks * (target / sums), target / (scale * scale))
    if lr_mask is not None:
        keep = ~np.asarray(lr_mask, dtype=bool)[..., None, :, None, :, None]
        scaled = np.where(keep, blocks, scaled)
    return scaled.reshape(hr.shape).astype(np.float32)


def share_out_spots(log_weights: Tensor, lr_counts: Tensor, scale: int) -> Tensor:
    """Share each LR spot's count out over its s x s HR bins by a softmax of ``log_weights`` inside the block.

    Parameters
    ----------
    log_weights
        (B, N, H, W) unnormalised log-weights of the HR bins, H = s * h.
    lr_counts
        (B, N, h, w) non-negative LR counts.
    scale
        Super-resolution factor s.

    Returns
    -------
    Tensor
        (B, N, H, W) HR counts whose blocks sum to ``lr_counts`` exactly (differentiable in the weights).
    """
    b, n, rows, cols = log_weights.shape
    h, w = rows // scale, cols // scale
    if rows % scale or cols % scale or tuple(lr_counts.shape[-2:]) != (h, w):
        raise ValueError(f"HR maps {rows} x {cols} do not split into s = {scale} blocks matching LR "
                         f"{tuple(lr_counts.shape[-2:])}")
    blocks = log_weights.reshape(b, n, h, scale, w, scale).permute(0, 1, 2, 4, 3, 5).reshape(b, n, h, w, -1)
    shared = blocks.softmax(dim=-1) * lr_counts[..., None]
    return shared.reshape(b, n, h, w, scale, scale).permute(0, 1, 2, 4, 3, 5).reshape(b, n, rows, cols)
