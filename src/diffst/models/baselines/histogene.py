"""HisToGene-style regressor (Pang et al. 2021): a small vision transformer over patches of the HR grid.

HisToGene embeds the histology patch of each spot, adds a learned embedding of the spot's position,
runs a transformer encoder over all spots of the slide and reads each spot's genes off a linear head.
Here the "spots" are square patches of ``P x P`` HR bins, ``P = 2 ** (len(channel_mult) - 1)``:

* input: the histology image resized to the H x W HR grid and the LR maps resampled onto it
  (:func:`~diffst.models.baselines.unet.regressor_inputs`), zero-padded to a multiple of P;
* patch embedding: one linear map of each patch's flattened pixels, image and LR values together (the
  sum of an image-patch embedding and a per-patch LR feature embedding), to width D;
* a learned 2D position embedding on the patch grid of an ``hr_size`` input, resized bilinearly to
  the actual patch grid when the tile size differs;
* ``2 * len(channel_mult)`` pre-norm transformer encoder layers (``num_heads`` heads, MLP width 4D,
  ``dropout``);
* a linear head per patch giving the ``out_channels`` values of its P x P bins.

D is the deepest width of the convolutional baselines, ``WIDTH_FACTOR * base_channels *
channel_mult[-1]`` (:func:`~diffst.models.baselines.unet.level_widths`). Like the other regressor
baselines it ignores x_t, t and the cell patches (:class:`~diffst.models.baselines.unet.RegressorBaseline`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffst.models.baselines.unet import RegressorBaseline, level_widths
from diffst.models.config import ModelConfig
from diffst.models.registry import register_model

__all__ = ["HisToGeneRegressor"]


@register_model("histogene")
class HisToGeneRegressor(RegressorBaseline):
    """HisToGene-style ViT regressor: conditions in, HR maps out, one token per P x P patch.

    See the module docstring for the layout.

    Parameters
    ----------
    cfg
        Model configuration (``n_genes``, ``image_channels``, ``base_channels``, ``channel_mult``,
        ``hr_size``, ``num_heads``, ``dropout``, ``learn_sigma``).
    """

    def __init__(self, cfg: ModelConfig):
        patch = 2 ** (len(cfg.channel_mult) - 1)
        super().__init__(cfg, size_multiple=patch)
        self.patch = patch
        dim = level_widths(cfg)[-1]
        self.embed = nn.Conv2d(self.in_channels, dim, patch, stride=patch)  # a linear map of each patch
        side = -(-cfg.hr_size // patch)
        self.position = nn.Parameter(nn.init.trunc_normal_(self.embed.weight.new_empty(1, dim, side, side), std=0.02))
        layer = nn.TransformerEncoderLayer(dim, cfg.num_heads, dim_feedforward=4 * dim, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, 2 * len(cfg.channel_mult), enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg.out_channels * patch * patch)

    def predict(self, inputs: Tensor) -> Tensor:
        """See :meth:`~diffst.models.baselines.unet.RegressorBaseline.predict`."""
        tokens = self.embed(inputs)  # (B, D, gh, gw)
        batch, _, gh, gw = tokens.shape
        position = self.position
        if position.shape[-2:] != (gh, gw):
            position = F.interpolate(position, size=(gh, gw), mode="bilinear", align_corners=False)
        tokens = (tokens + position).flatten(2).transpose(1, 2)  # (B, gh * gw, D)
        values = self.head(self.norm(self.transformer(tokens)))  # (B, gh * gw, out * P * P)
        p, out = self.patch, self.cfg.out_channels
        values = values.reshape(batch, gh, gw, out, p, p).permute(0, 3, 1, 4, 2, 5)
        return values.reshape(batch, out, gh * p, gw * p)
