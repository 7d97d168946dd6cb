"""Diff-ST denoiser (Wang et al., MICCAI 2024).

A conditional U-Net with hierarchical histology features, cross-modal adaptive modulation, multi-modal
disentangling and a gene-correlation graph.

Data flow for noisy HR maps x_t (B, N, H, W):

* U-Net input: x_t, the LR maps resampled onto the H x W grid and (CIGC-Graph on) N graph-refined
  per-gene maps, concatenated.
* Conditioning branch on the grid of U-Net level ``condition_level`` (64 x 64 for 256 x 256):
  histology features F_h (tissue level, refined by cell-to-tissue cross-attention) and LR features F_y,
  modulated by CAM in both directions, split and fused by the disentangling module, then added to the
  U-Net encoder at that level.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.errors import InputError
from diffst.models.base import DenoiserOutput, EncodedConditions
from diffst.models.cam import CrossModalAdaptiveModulation
from diffst.models.config import ModelConfig
from diffst.models.disentangle import ModalityFusion
from diffst.models.graph import GeneCorrelationGraph
from diffst.models.histology import HierarchicalHistologyEncoder
from diffst.models.inputs import check_inputs, resample_lr
from diffst.models.registry import register_model
from diffst.models.unet import ConditionalUNet, attention_levels_for, group_norm

__all__ = ["DiffST", "resample_to_grid"]


def resample_to_grid(
    feat: Tensor, hr_size: tuple[int, int], grid_size: tuple[int, int], stride: int, mode: str = "bilinear"
) -> Tensor:
    """Resample a map covering the HR tile onto a coarse grid of the zero-padded HR frame.

    Cell (i, j) of the grid covers HR pixels [i * stride, (i + 1) * stride) x [j * stride, ...); the map
    ``feat`` covers HR pixels [0, H) x [0, W) whatever its own size. Cells beyond the tile (padding)
    get zeros. No integer ratio between ``feat`` and the HR grid is assumed.

    Parameters
    ----------
    feat
        (B, C, h, w) map of the whole tile (LR maps, histology features, ...).
    hr_size
        (H, W) of the unpadded HR grid.
    grid_size
        (Hc, Wc) of the coarse grid; Hc * stride >= H.
    stride
        HR pixels per grid cell.
    mode
        ``grid_sample`` interpolation mode.
    """
    height, width = hr_size
    target_h, target_w = -(-height // stride), -(-width // stride)
    if feat.shape[-2] >= 2 * target_h and feat.shape[-1] >= 2 * target_w:
        # Average first when shrinking a lot, so point sampling does not alias.
        feat = F.adaptive_avg_pool2d(feat, (target_h, target_w))
    centres_y = (torch.arange(grid_size[0], device=feat.device, dtype=feat.dtype) + 0.5) * stride
    centres_x = (torch.arange(grid_size[1], device=feat.device, dtype=feat.dtype) + 0.5) * stride
    norm_y = 2 * centres_y / height - 1
    norm_x = 2 * centres_x / width - 1
    grid = torch.stack(torch.meshgrid(norm_x, norm_y, indexing="xy"), dim=-1)
    grid = grid[None].expand(feat.shape[0], -1, -1, -1)
    return F.grid_sample(feat, grid, mode=mode, padding_mode="zeros", align_corners=False)


@register_model("diffst")
class DiffST(nn.Module):
    """The Diff-ST denoiser; every paper component is switchable through ``cfg``.

    Parameters
    ----------
    cfg
        Model configuration (``arch == "diffst"``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_genes, cfg.d_tissue
        self.graph = (
            GeneCorrelationGraph(n, cfg.graph_node_size, cfg.graph_hidden, cfg.graph_alpha)
            if cfg.use_graph
            else None
        )
        self.histology = HierarchicalHistologyEncoder(
            cfg.image_channels, cfg.d_tissue, cfg.d_cell, cfg.d_attn, hierarchical=cfg.use_hierarchical
        )
        self.lr_encoder = nn.Sequential(
            nn.Conv2d(n, d, 3, padding=1), group_norm(d), nn.SiLU(), nn.Conv2d(d, d, 3, padding=1)
        )
        self.cam = CrossModalAdaptiveModulation(d, cfg.cam_window, cfg.d_attn) if cfg.use_cam else None
        self.fusion = ModalityFusion(d, d, disentangle=cfg.use_disentangle)
        in_channels = (3 if cfg.use_graph else 2) * n
        self.unet = ConditionalUNet(
            in_channels=in_channels,
            out_channels=cfg.out_channels,
            base_channels=cfg.base_channels,
            channel_mult=cfg.channel_mult,
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=attention_levels_for(cfg.attention_resolutions, cfg.hr_size, len(cfg.channel_mult)),
            num_heads=cfg.num_heads,
            dropout=cfg.dropout,
            injection_channels={cfg.condition_level: d},
        )

    def set_coexpression(self, matrix: np.ndarray | Tensor) -> None:
        """Set the CIGC-Graph adjacency (N, N), e.g. ``coexpression_matrix(train_hr_counts)``.

        A no-op when the graph is switched off.
        """
        if self.graph is not None:
            self.graph.set_coexpression(matrix)

    def condition_features(
        self,
        hr_size: tuple[int, int],
        *,
        lr: Tensor,
        tissue: Tensor,
        cells: Tensor | None,
        cell_entropy: Tensor | None,
        entropy_threshold: float | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Fused histology/LR condition map on the U-Net's ``condition_level`` grid, and aux losses."""
        stride = 2**self.cfg.condition_level
        pad_h, pad_w = self.unet.padded_size(*hr_size)
        grid = (pad_h // stride, pad_w // stride)
        hist = self.histology(tissue, cells, cell_entropy, entropy_threshold)
        feat_h = resample_to_grid(hist, hr_size, grid, stride)
        feat_y = self.lr_encoder(resample_to_grid(lr, hr_size, grid, stride, mode="bicubic"))
        if self.cam is not None:
            feat_y, feat_h = self.cam(feat_y, feat_h)
        return self.fusion(feat_y, feat_h)

    def encode_conditions(
        self,
        hr_size: tuple[int, int],
        *,
        lr: Tensor,
        tissue: Tensor,
        cells: Tensor | None = None,
        cell_entropy: Tensor | None = None,
        entropy_threshold: float | None = None,
    ) -> EncodedConditions:
        """Encode the conditions of B tiles for HR maps of ``hr_size``: everything that depends on neither x_t nor t.

        ``forward_encoded(x_t, t, encode_conditions(hr_size, **cond))`` equals ``forward(x_t, t, **cond)``;
        a sampler encodes once per tile and calls :meth:`forward_encoded` at every step.

        Parameters
        ----------
        hr_size
            (H, W) of the HR maps the encoding is for.
        lr, tissue, cells, cell_entropy, entropy_threshold
            As in :meth:`forward`.

        Returns
        -------
        EncodedConditions
            ``features``: ``"lr_on_hr"`` (B, N, H, W), the LR maps on the HR grid, and ``"condition"``, the
            fused histology/LR map on the ``condition_level`` grid; ``aux_losses``: ``"disentangle"`` iff enabled.
        """
        cfg = self.cfg
        if cfg.use_hierarchical and (cells is None or cell_entropy is None):
            raise InputError("this Diff-ST model is hierarchical: pass `cells` and `cell_entropy`")
        hr_size = (int(hr_size[0]), int(hr_size[1]))
        condition, aux = self.condition_features(
            hr_size,
            lr=lr,
            tissue=tissue,
            cells=cells,
            cell_entropy=cell_entropy,
            entropy_threshold=entropy_threshold,
        )
        return EncodedConditions({"lr_on_hr": resample_lr(lr, hr_size), "condition": condition}, aux)

    def forward_encoded(self, x_t: Tensor, t: Tensor, encoded: EncodedConditions) -> DenoiserOutput:
        """Predict from noisy HR maps and conditions encoded by :meth:`encode_conditions`.

        Parameters
        ----------
        x_t
            (B, N, H, W) noisy HR maps, H and W those the conditions were encoded for.
        t
            (B,) timesteps.
        encoded
            The encoding of the same B tiles.

        Returns
        -------
        DenoiserOutput
            As :meth:`forward`.
        """
        lr_on_hr = encoded.features["lr_on_hr"]
        if x_t.shape[0] != lr_on_hr.shape[0] or x_t.shape[1:] != lr_on_hr.shape[1:]:
            raise InputError(f"x_t is {tuple(x_t.shape)} but the conditions were encoded for {tuple(lr_on_hr.shape)}")
        inputs = [x_t, lr_on_hr]
        if self.graph is not None:
            inputs.append(self.graph(x_t))
        prediction = self.unet(
            torch.cat(inputs, dim=1), t, injections={self.cfg.condition_level: encoded.features["condition"]}
        )
        return DenoiserOutput(prediction=prediction, aux_losses=dict(encoded.aux_losses))

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        lr: Tensor,
        tissue: Tensor,
        cells: Tensor | None = None,
        cell_entropy: Tensor | None = None,
        entropy_threshold: float | None = None,
    ) -> DenoiserOutput:
        """Predict epsilon (and the variance interpolation v with learned sigma).

        Parameters
        ----------
        x_t
            (B, N, H, W) noisy HR maps; any H, W.
        t
            (B,) timesteps (long or float).
        lr
            (B, N, h, w) LR maps of the same tile (any h, w; resampled, no integer scale assumed).
        tissue
            (B, C, S, S) tile image in [0, 1].
        cells
            (B, M, C, p, p) cell-level patches in [0, 1] (needed when ``use_hierarchical``).
        cell_entropy
            (B, M) entropy of each patch.
        entropy_threshold
            Curriculum gamma: only patches with entropy > gamma are attended (the most complex one is
            always kept). ``None`` uses every patch (inference).

        Returns
        -------
        DenoiserOutput
            ``prediction`` (B, 2N or N, H, W); ``aux_losses`` has ``"disentangle"`` iff enabled.
        """
        cfg = self.cfg
        check_inputs(x_t, t, lr, tissue, cfg.n_genes, cfg.image_channels, cells, cell_entropy)
        encoded = self.encode_conditions(
            tuple(x_t.shape[-2:]),
            lr=lr,
            tissue=tissue,
            cells=cells,
            cell_entropy=cell_entropy,
            entropy_threshold=entropy_threshold,
        )
        return self.forward_encoded(x_t, t, encoded)
