"""The entropy curriculum of the cell-level patches (paper Sec. 2.2, part 2), in one place.

* :func:`patch_entropy`: how complex a cell patch is, measured once when a tile is prepared
  (:func:`diffst.data.tiling.tile_histology`) and stored with the tile as ``cell_entropy``;
* :func:`curriculum_threshold`: the threshold gamma that rises during training (the training loop), whose
  value at the end of training is saved with the run and used at inference;
* :func:`kept_patch_mask`: the patches with an entropy above gamma, the ones the histology encoder
  (:class:`diffst.models.histology.HierarchicalHistologyEncoder`) attends to.

Selection is a key-padding mask, so tensor shapes never depend on the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffst.errors import InputError

__all__ = ["curriculum_threshold", "kept_patch_mask", "patch_entropy"]


def patch_entropy(patch: np.ndarray) -> float:
    """Shannon entropy (bits) of one cell patch.

    Parameters
    ----------
    patch
        (rows, cols, C) float image in [0, 1] at full working resolution; it is measured in 8-bit grey
        (the channel mean, times 255, truncated).
    """
    from skimage.measure import shannon_entropy

    grey = (patch.mean(axis=-1) * 255).astype(np.uint8)
    return shannon_entropy(grey)


def curriculum_threshold(
    progress: float,
    entropies: np.ndarray | Tensor,
    milestones: Sequence[float] = (0.25, 0.5),
    quantiles: Sequence[float] = (0.0, 0.5, 0.75),
) -> float:
    """Entropy threshold gamma for the curriculum patch selection at a point of training.

    gamma is the ``quantiles[k]`` quantile of the training-set patch entropies, where k is the number of
    milestones already passed; with the defaults all patches are used in the first quarter of training,
    the more complex half until mid-training and the most complex quarter afterwards (the paper: later
    training sees only the more complex patches).

    Parameters
    ----------
    progress
        Fraction of training done, in [0, 1] (clipped).
    entropies
        Entropies of the training patches, any shape.
    milestones
        Increasing progress values at which gamma steps up; ``len(quantiles) == len(milestones) + 1``.
    quantiles
        Non-decreasing quantile levels in [0, 1] used between milestones. A level of 0 returns ``-inf``
        (keep everything, including the least complex patch).

    Returns
    -------
    float
        gamma, non-decreasing in ``progress``.
    """
    if len(quantiles) != len(milestones) + 1:
        raise InputError("need exactly one more quantile than milestones")
    if any(b < a for a, b in zip(milestones, milestones[1:], strict=False)) or any(
        b < a for a, b in zip(quantiles, quantiles[1:], strict=False)
    ):
        raise InputError("milestones and quantiles must be non-decreasing")
    values = entropies.detach().cpu().numpy() if isinstance(entropies, Tensor) else np.asarray(entropies)
    values = values.astype(np.float64).ravel()
    if values.size == 0:
        raise InputError("entropies is empty")
    progress = min(max(float(progress), 0.0), 1.0)
    stage = sum(progress >= m for m in milestones)
    q = float(quantiles[stage])
    if q <= 0.0:
        return float("-inf")
    return float(np.quantile(values, q))


def kept_patch_mask(cell_entropy: Tensor, threshold: float | None) -> Tensor:
    """Which cell patches take part in cross-attention.

    Parameters
    ----------
    cell_entropy
        (B, M) image entropy of each patch.
    threshold
        gamma; a patch is kept iff its entropy > gamma. ``None`` keeps every patch.

    Returns
    -------
    Tensor
        (B, M) bool; at least the most complex patch of each tile is always kept, so attention is
        never over an empty set.
    """
    if threshold is None:
        return torch.ones_like(cell_entropy, dtype=torch.bool)
    keep = cell_entropy > threshold
    top1 = F.one_hot(cell_entropy.argmax(dim=1), cell_entropy.shape[1]).bool()
    return keep | top1
