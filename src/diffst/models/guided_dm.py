"""Guided-DM: the guided-diffusion super-resolution U-Net, the paper's diffusion baseline.

All conditions are concatenated to the noisy maps as input channels: the LR maps resampled onto the HR
grid and the histology image resized to H x W. Cell patches are ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.models.base import Denoiser, DenoiserOutput
from diffst.models.config import ModelConfig
from diffst.models.inputs import check_inputs, resample_lr
from diffst.models.registry import register_model
from diffst.models.unet import ConditionalUNet, attention_levels_for

__all__ = ["GuidedDMBaseline"]


@register_model("guided_dm")
class GuidedDMBaseline(nn.Module, Denoiser):
    """Guided-diffusion SR U-Net conditioned by concatenation.

    It has no gene graph: the co-expression matrix is ignored (:meth:`Denoiser.set_coexpression`).

    Parameters
    ----------
    cfg
        Model configuration; uses the backbone fields (channels, levels, attention, learn_sigma).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        in_channels = 2 * cfg.n_genes + cfg.image_channels
        self.unet = ConditionalUNet(
            in_channels=in_channels,
            out_channels=cfg.out_channels,
            base_channels=cfg.base_channels,
            channel_mult=cfg.channel_mult,
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=attention_levels_for(cfg.attention_resolutions, cfg.hr_size, len(cfg.channel_mult)),
            num_heads=cfg.num_heads,
            dropout=cfg.dropout,
        )

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
        """Predict epsilon (and v) from x_t and the concatenated conditions.

        Parameters
        ----------
        x_t
            (B, N, H, W) noisy HR maps.
        t
            (B,) timesteps.
        lr
            (B, N, h, w) LR maps of the same tile.
        tissue
            (B, C, S, S) histology image in [0, 1].
        cells, cell_entropy, entropy_threshold
            Accepted for a uniform interface and ignored.
        """
        check_inputs(x_t, t, lr, tissue, self.cfg.n_genes, self.cfg.image_channels)
        size = tuple(x_t.shape[-2:])
        image = F.interpolate(tissue, size=size, mode="bilinear", align_corners=False, antialias=True)
        inputs = torch.cat([x_t, resample_lr(lr, size), image * 2 - 1], dim=1)
        return DenoiserOutput(prediction=self.unet(inputs, t))
