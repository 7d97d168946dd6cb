"""Hierarchical cell-to-tissue histology features (paper Sec. 2.2, part 2).

Tissue level: the whole tile image -> F_tissue (d_t channels, a feature map).
Cell level: M small patches of the tile -> F_cell (M tokens of d_c channels).
Curriculum selection: a patch takes part iff its entropy exceeds a threshold gamma that rises during
training (:mod:`diffst.core.curriculum`). Selection is a key-padding mask, so tensor shapes never depend
on the data.
Cell-to-tissue cross-attention: softmax(Q K^T / sqrt(d)) V with Q from the flattened F_tissue and K, V
from the kept cell tokens, added back to F_tissue.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffst.core.curriculum import kept_patch_mask
from diffst.errors import InputError
from diffst.models.unet import group_norm

__all__ = [
    "TissueEncoder",
    "CellEncoder",
    "CellToTissueAttention",
    "HierarchicalHistologyEncoder",
]


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
