"""TESLA-style super-resolution (Hu et al., Cell Systems 2023, in spirit), training-free.

Each HR bin takes a weighted average of the interpolated expression around it, weighted by spatial closeness and by how
similar the histology of the two bins looks, so expression follows tissue boundaries the LR grid blurs.
"""

from __future__ import annotations

import numpy as np

from diffst.baselines.histology_features import bin_image_stats
from diffst.baselines.interpolation import interpolate_lr


def tesla_like(lr_counts: np.ndarray, tissue: np.ndarray, hr_shape: tuple[int, int], scale: int,
               radius: int | None = None, sigma_image: float = 0.5) -> np.ndarray:
    """Histology-guided smoothing of the bicubic map (a joint bilateral filter).

    Parameters
    ----------
    lr_counts
        (T, N, h, w) LR counts.
    tissue
        (T, C, S, S) tissue-level images.
    hr_shape
        (H, W) of the HR grid.
    scale
        Super-resolution factor s; the default window radius is s bins (one LR bin).
    radius
        Window radius in HR bins.
    sigma_image
        Width of the histology similarity kernel, in standard deviations of the per-bin colour.

    Returns
    -------
    np.ndarray
        (T, N, H, W) HR counts per bin.
    """
    radius = scale if radius is None else radius
    base = interpolate_lr(lr_counts, hr_shape, scale).astype(np.float64)
    colour = bin_image_stats(tissue, tuple(hr_shape))[:, : np.asarray(tissue).shape[1]].astype(np.float64)
    colour = (colour - colour.mean(axis=(0, 2, 3), keepdims=True)) / (colour.std(axis=(0, 2, 3), keepdims=True) + 1e-8)
    h, w = hr_shape
    pad = radius
    base_p = np.pad(base, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    col_p = np.pad(colour, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    sigma_space = max(radius / 2.0, 1.0)
    total = np.zeros_like(base)
    weights = np.zeros((base.shape[0], 1, h, w))
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = col_p[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w]
            similarity = ((shifted - colour) ** 2).sum(axis=1, keepdims=True)
            wgt = np.exp(-(dy * dy + dx * dx) / (2 * sigma_space**2) - similarity / (2 * sigma_image**2))
            total += wgt * base_p[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w]
            weights += wgt
    return (total / weights).astype(np.float32)
