"""Attention U-Net regressor (Oktay et al. 2018): a U-Net whose skips pass through additive attention gates.

At each decoder level the encoder's skip features x are weighted by attention coefficients computed
from x and the gating signal g, the decoder features one level coarser (grid-attention gate)::

    q     = ReLU(W_x x + W_g g)                 (W_x: 2x2 conv, stride 2, onto g's grid; W_g: 1x1 conv)
    alpha = sigmoid(psi(q)), upsampled bilinearly to x's grid
    x_hat = W(alpha * x)                        (W: 1x1 conv + GroupNorm)

then concatenated with the upsampled g as in the plain U-Net.

Inputs, ignored arguments and sizes are those of the plain U-Net (:mod:`diffst.models.baselines.unet`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.models.baselines.unet import ConvBlock, Encoder, RegressorBaseline, level_widths, upsample2x
from diffst.models.config import ModelConfig
from diffst.models.registry import register_model
from diffst.models.unet import group_norm

__all__ = ["AttentionGate", "AttentionUNetRegressor"]


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (one coefficient per pixel, shared by the channels).

    Parameters
    ----------
    skip_channels
        Channels of the skip features x.
    gate_channels
        Channels of the gating signal g, on a grid half the size of x's.
    inter_channels
        Channels of the intermediate map q.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.theta = nn.Conv2d(skip_channels, inter_channels, 2, stride=2, bias=False)
        self.phi = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)
        self.out = nn.Sequential(nn.Conv2d(skip_channels, skip_channels, 1), group_norm(skip_channels))

    def coefficients(self, x: Tensor, g: Tensor) -> Tensor:
        """Attention coefficients in (0, 1), shape (B, 1, H, W), of skip x (B, C_x, H, W) under gate g.

        Parameters
        ----------
        x
            (B, C_x, H, W) skip features, H and W even.
        g
            (B, C_g, H / 2, W / 2) gating signal.

        Returns
        -------
        Tensor
        """
        q = F.relu(self.theta(x) + self.phi(g))
        alpha = torch.sigmoid(self.psi(q))
        return F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        """Gate skip x (B, C_x, H, W) with signal g (B, C_g, H / 2, W / 2) -> (B, C_x, H, W)."""
        return self.out(x * self.coefficients(x, g))


@register_model("attention_unet")
class AttentionUNetRegressor(RegressorBaseline):
    """Attention U-Net regressor: conditions in, HR maps out, with attention-gated skips.

    The plain U-Net (:class:`~diffst.models.baselines.unet.UNetRegressor`) with an
    :class:`AttentionGate` on every skip; the gate's intermediate width is half the skip's.

    Parameters
    ----------
    cfg
        Model configuration (``n_genes``, ``image_channels``, ``base_channels``, ``channel_mult``,
        ``num_res_blocks``, ``dropout``, ``learn_sigma``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, size_multiple=2 ** (len(cfg.channel_mult) - 1))
        widths = level_widths(cfg)
        levels = range(len(widths) - 1)
        self.encoder = Encoder(self.in_channels, widths, cfg.num_res_blocks, cfg.dropout)
        self.gates = nn.ModuleList(AttentionGate(widths[i], widths[i + 1], max(widths[i] // 2, 1)) for i in levels)
        self.upsamples = nn.ModuleList(upsample2x(widths[i + 1], widths[i]) for i in levels)
        self.decoder = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], cfg.dropout) for i in levels)
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)

    def predict(self, inputs: Tensor) -> Tensor:
        """See :meth:`~diffst.models.baselines.unet.RegressorBaseline.predict`."""
        skips = self.encoder(inputs)
        h = skips.pop()  # the bottleneck
        for level in reversed(range(len(self.decoder))):
            gated = self.gates[level](skips.pop(), h)
            h = self.decoder[level](torch.cat([gated, self.upsamples[level](h)], dim=1))
        return self.head(h)
