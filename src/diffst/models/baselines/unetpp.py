"""U-Net++ regressor (Zhou et al. 2018): a U-Net whose skips are nested, densely connected pathways.

Node X(i, j) sits at level i (0 = full resolution) and column j. Column 0 is the encoder; node X(i, j)
for j >= 1 applies a double-convolution to the concatenation of every earlier node of its level,
X(i, 0) ... X(i, j - 1), and the 2x-upsampled X(i + 1, j - 1). The prediction is a 1x1 convolution of
X(0, L), L = ``len(channel_mult) - 1``. The paper's deep supervision (heads on X(0, 1) ... X(0, L)) is
not used: the regression objective trains one prediction.

Inputs, ignored arguments and sizes are those of the plain U-Net (:mod:`diffst.models.baselines.unet`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffst.models.baselines.unet import ConvBlock, Encoder, RegressorBaseline, level_widths, upsample2x
from diffst.models.config import ModelConfig
from diffst.models.registry import register_model

__all__ = ["UNetPlusPlusRegressor"]


@register_model("unetpp")
class UNetPlusPlusRegressor(RegressorBaseline):
    """U-Net++ regressor: conditions in, HR maps out, through nested dense skip pathways.

    Node X(i, j) has the width of level i; each has its own 2x2 transposed convolution upsampling
    X(i + 1, j - 1). See the module docstring for the layout.

    Parameters
    ----------
    cfg
        Model configuration (``n_genes``, ``image_channels``, ``base_channels``, ``channel_mult``,
        ``num_res_blocks`` (encoder only), ``dropout``, ``learn_sigma``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, size_multiple=2 ** (len(cfg.channel_mult) - 1))
        widths = level_widths(cfg)
        self.depth = len(widths) - 1
        self.encoder = Encoder(self.in_channels, widths, cfg.num_res_blocks, cfg.dropout)
        # Nested nodes keyed "i_j" for j >= 1 and i + j <= depth.
        self.nodes = nn.ModuleDict()
        self.upsamples = nn.ModuleDict()
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                self.upsamples[f"{i}_{j}"] = upsample2x(widths[i + 1], widths[i])
                self.nodes[f"{i}_{j}"] = ConvBlock((j + 1) * widths[i], widths[i], cfg.dropout)
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)

    def predict(self, inputs: Tensor) -> Tensor:
        """See :meth:`~diffst.models.baselines.unet.RegressorBaseline.predict`."""
        grid = [[x] for x in self.encoder(inputs)]  # grid[i][j] = X(i, j)
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                up = self.upsamples[f"{i}_{j}"](grid[i + 1][j - 1])
                grid[i].append(self.nodes[f"{i}_{j}"](torch.cat([*grid[i], up], dim=1)))
        return self.head(grid[0][self.depth])
