"""Spot consistency: make every s x s block of a super-resolved map add up to the LR count measured there."""

from __future__ import annotations

import numpy as np


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
