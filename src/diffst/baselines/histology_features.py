"""Per-HR-bin statistics of a tile's histology image, shared by the learned-free and linear baselines."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter


def bin_image_stats(tissue: np.ndarray, hr_shape: tuple[int, int]) -> np.ndarray:
    """Mean and standard deviation of each image channel inside every HR bin.

    Parameters
    ----------
    tissue
        (..., C, S, S) tissue-level images, uint8 (0-255) or float in [0, 1].
    hr_shape
        (H, W) of the HR grid the bins belong to.

    Returns
    -------
    np.ndarray
        (..., 2C, H, W) float32: C channel means, then C channel standard deviations, in [0, 1] units.
    """
    img = torch.from_numpy(np.asarray(tissue, dtype=np.float32))
    if np.asarray(tissue).dtype == np.uint8:
        img = img / 255.0
    lead = img.shape[:-3]
    flat = img.reshape(-1, *img.shape[-3:])
    mean = F.adaptive_avg_pool2d(flat, hr_shape)
    var = (F.adaptive_avg_pool2d(flat * flat, hr_shape) - mean * mean).clamp_min(0.0)
    out = torch.cat([mean, var.sqrt()], dim=1)
    return out.reshape(*lead, out.shape[1], *hr_shape).numpy()


def neighbourhood_features(stats: np.ndarray, sizes: tuple[int, ...] = (3, 7)) -> np.ndarray:
    """Append to the bin statistics their means over square neighbourhoods of each size (in bins).

    ``stats`` is (..., F, H, W); returns (..., F * (1 + len(sizes)), H, W).
    """
    parts = [stats]
    for size in sizes:
        window = [1] * (stats.ndim - 2) + [size, size]
        parts.append(uniform_filter(stats, size=window, mode="nearest"))
    return np.concatenate(parts, axis=-3).astype(np.float32)
