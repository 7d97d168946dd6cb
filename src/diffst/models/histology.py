"""Hierarchical cell-to-tissue histology features (paper Sec. 2.2, part 2).

Tissue level: the whole tile image -> F_tissue (d_t channels, a feature map).
Cell level: M small patches of the tile -> F_cell (M tokens of d_c channels).
Curriculum selection: a patch takes part iff its entropy exceeds a threshold gamma that rises during
training. Selection is a key-padding mask, so tensor shapes never depend on the data.
Cell-to-tissue cross-attention: softmax(Q K^T / sqrt(d)) V with Q from the flattened F_tissue and K, V
from the kept cell tokens, added back to F_tissue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.errors import InputError
from diffst.models.unet import group_norm

__all__ = [
    "TissueEncoder",
    "CellEncoder",
    "CellToTissueAttention",
    "HierarchicalHistologyEncoder",
    "kept_patch_mask",
    "curriculum_threshold",
]


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


class TissueEncoder(nn.Module):
    """Convolutional encoder of the whole tile image to a d_t-channel map at 1/4 of its size."""

    def __init__(self, image_channels: int, d_tissue: int):
        super().__init__()
        hidden = max(d_tissue // 4, 8)
        self.layers = nn.Sequential(
            nn.Conv2d(image_channels, hidden, 3, stride=2, padding=1),
            group_norm(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, d_tissue, 3, stride=2, padding=1),
            group_norm(d_tissue),
            nn.SiLU(),
            nn.Conv2d(d_tissue, d_tissue, 3, padding=1),
        )

    def forward(self, tissue: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> (B, d_t, ceil(S/4), ceil(S/4))."""
        return self.layers(tissue * 2 - 1)


class CellEncoder(nn.Module):
    """Shared encoder of each cell patch to one d_c-dimensional token."""

    def __init__(self, image_channels: int, d_cell: int):
        super().__init__()
        hidden = max(d_cell // 4, 8)
        self.layers = nn.Sequential(
            nn.Conv2d(image_channels, hidden, 3, padding=1),
            group_norm(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1),
            group_norm(2 * hidden),
            nn.SiLU(),
        )
        self.head = nn.Linear(2 * hidden, d_cell)

    def forward(self, cells: Tensor) -> Tensor:
        """(B, M, C, p, p) in [0, 1] -> (B, M, d_c)."""
        b, m = cells.shape[:2]
        feats = self.layers(cells.flatten(0, 1) * 2 - 1).mean(dim=(-2, -1))
        return self.head(feats).reshape(b, m, -1)


class CellToTissueAttention(nn.Module):
    """Single-head cross-attention from tissue pixels (queries) to kept cell tokens (keys, values).

    W_Q: d_t -> d, W_K: d_c -> d, W_V: d_c -> d_t as in the paper; the result is added to F_tissue.
    """

    def __init__(self, d_tissue: int, d_cell: int, d_attn: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(d_tissue)
        self.key_norm = nn.LayerNorm(d_cell)
        self.to_q = nn.Linear(d_tissue, d_attn, bias=False)
        self.to_k = nn.Linear(d_cell, d_attn, bias=False)
        self.to_v = nn.Linear(d_cell, d_tissue, bias=False)
        self.scale = 1.0 / math.sqrt(d_attn)

    def forward(self, tissue_map: Tensor, cell_tokens: Tensor, keep: Tensor) -> Tensor:
        """Fuse cell tokens into the tissue map.

        Parameters
        ----------
        tissue_map
            (B, d_t, h, w) F_tissue.
        cell_tokens
            (B, M, d_c) F_cell.
        keep
            (B, M) bool key padding mask (True = patch is used).
        """
        b, c, h, w = tissue_map.shape
        queries = tissue_map.flatten(2).transpose(1, 2)  # (B, h*w, d_t)
        q = self.to_q(self.query_norm(queries))
        tokens = self.key_norm(cell_tokens)
        k, v = self.to_k(tokens), self.to_v(tokens)
        scores = torch.einsum("bld,bmd->blm", q, k) * self.scale
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        attended = torch.einsum("blm,bmd->bld", scores.softmax(dim=-1), v)
        return tissue_map + attended.transpose(1, 2).reshape(b, c, h, w)


class HierarchicalHistologyEncoder(nn.Module):
    """Tissue-level features, refined by the selected cell-level features when hierarchical.

    Parameters
    ----------
    image_channels
        Channels of the histology image (3 RGB, 1 DAPI, ...).
    d_tissue, d_cell, d_attn
        Feature sizes (paper: 128 each).
    hierarchical
        If False only the tissue level is used (the paper's "w/o hierarchical" ablation).
    """

    def __init__(self, image_channels: int, d_tissue: int, d_cell: int, d_attn: int, hierarchical: bool = True):
        super().__init__()
        self.hierarchical = hierarchical
        self.tissue_encoder = TissueEncoder(image_channels, d_tissue)
        if hierarchical:
            self.cell_encoder = CellEncoder(image_channels, d_cell)
            self.cross_attention = CellToTissueAttention(d_tissue, d_cell, d_attn)

    def forward(
        self,
        tissue: Tensor,
        cells: Tensor | None = None,
        cell_entropy: Tensor | None = None,
        entropy_threshold: float | None = None,
    ) -> Tensor:
        """(B, C, S, S) tile image (+ cell patches) -> (B, d_t, ceil(S/4), ceil(S/4)) histology features."""
        tissue_map = self.tissue_encoder(tissue)
        if not self.hierarchical:
            return tissue_map
        if cells is None or cell_entropy is None:
            raise InputError("the hierarchical histology encoder needs `cells` and `cell_entropy`")
        keep = kept_patch_mask(cell_entropy, entropy_threshold)
        return self.cross_attention(tissue_map, self.cell_encoder(cells), keep)
