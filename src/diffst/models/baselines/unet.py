"""Plain U-Net regressor (Ronneberger et al. 2015), and the parts the regressor baselines share.

The regressor baselines map the conditions straight to HR maps: the LR maps resampled onto the H x W
grid and the histology image resized to H x W, concatenated as input channels, as in Guided-DM. They
have no timestep and no noisy input: trained with ``train.objective: regression``, they are called
through :func:`~diffst.models.base.regress` with x_t = 0 at t = 0, and they ignore both arguments (and
the cell patches) in any call.

Sizes follow the :class:`~diffst.models.config.ModelConfig` backbone fields: ``len(channel_mult)``
levels (``len(channel_mult) - 1`` downsamplings), level widths ``WIDTH_FACTOR * base_channels * mult``
(see :data:`WIDTH_FACTOR`), ``num_res_blocks`` double-convolution blocks per encoder level and
``dropout`` inside them. Fields of the diffusion models (attention resolutions, the Diff-ST components)
are ignored. Inputs of any size are zero-padded at the bottom/right to a multiple of
``2 ** (len(channel_mult) - 1)`` and the prediction is cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.models.base import Denoiser, DenoiserOutput
from diffst.models.config import ModelConfig
from diffst.models.inputs import check_inputs, resample_lr
from diffst.models.registry import register_model
from diffst.models.unet import group_norm

__all__ = [
    "WIDTH_FACTOR",
    "ConvBlock",
    "Encoder",
    "conv_stack",
    "upsample2x",
    "RegressorBaseline",
    "UNetRegressor",
    "level_widths",
    "regressor_inputs",
]

#: Level widths of the convolutional regressors are ``WIDTH_FACTOR * base_channels * channel_mult[i]``.
#: A level of these networks (3x3 double-convolutions, no timestep embedding, no attention, no middle
#: block) holds about a quarter of the parameters of a guided-diffusion level of the same width, so twice
#: the width puts the ``cpu`` preset's regressors near the ``cpu`` Diff-ST's size (1.2-1.4 M vs 1.29 M
#: parameters at 25 genes and one image channel).
WIDTH_FACTOR = 2


def level_widths(cfg: ModelConfig) -> list[int]:
    """Channel width of each U-Net level of a regressor baseline.

    Parameters
    ----------
    cfg
        Model configuration (``base_channels``, ``channel_mult``).

    Returns
    -------
    list of int
        ``WIDTH_FACTOR * base_channels * mult`` for each level, finest first.
    """
    return [WIDTH_FACTOR * cfg.base_channels * m for m in cfg.channel_mult]


def regressor_inputs(lr: Tensor, tissue: Tensor, size: tuple[int, int]) -> Tensor:
    """Concatenate the conditions on the HR grid: resampled LR maps, then the image in [-1, 1].

    Parameters
    ----------
    lr
        (B, N, h, w) LR maps in model space.
    tissue
        (B, C, S, S) histology image in [0, 1].
    size
        (H, W) of the HR grid.

    Returns
    -------
    Tensor
        (B, N + C, H, W): the LR maps resampled bicubically (:func:`~diffst.models.inputs.resample_lr`)
        and the image resized with antialiased bilinear interpolation, as Guided-DM does.
    """
    image = F.interpolate(tissue, size=size, mode="bilinear", align_corners=False, antialias=True)
    return torch.cat([resample_lr(lr, size), image * 2 - 1], dim=1)


class ConvBlock(nn.Module):
    """Double 3x3 convolution: (conv, GroupNorm, ReLU) twice, with dropout between the two.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input and of the output.
    dropout
        Dropout probability after the first convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        return self.layers(x)


def conv_stack(in_channels: int, out_channels: int, blocks: int, dropout: float) -> nn.Sequential:
    """Return ``blocks`` double-convolutions (:class:`ConvBlock`) in a row, the first changing the width.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input and of the output.
    blocks
        Number of double-convolutions (at least 1).
    dropout
        Dropout inside each block.

    Returns
    -------
    nn.Sequential
    """
    return nn.Sequential(*(ConvBlock(in_channels if i == 0 else out_channels, out_channels, dropout)
                           for i in range(blocks)))


def upsample2x(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """Return a learned 2x upsampling: a 2x2 transposed convolution of stride 2.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the coarse input and of the upsampled output.

    Returns
    -------
    nn.ConvTranspose2d
    """
    return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)


class Encoder(nn.Module):
    """Contracting path shared by the convolutional regressors.

    Level i holds ``blocks`` double-convolutions of width ``widths[i]``; levels after the first start
    with a 2x2 max-pooling.

    Parameters
    ----------
    in_channels
        Channels of the input.
    widths
        Width of each level, finest first.
    blocks
        Double-convolutions per level.
    dropout
        Dropout inside each block.
    """

    def __init__(self, in_channels: int, widths: list[int], blocks: int, dropout: float):
        super().__init__()
        entry = [in_channels, *widths[:-1]]
        self.levels = nn.ModuleList(conv_stack(c, w, blocks, dropout) for c, w in zip(entry, widths, strict=True))

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, C, H, W), H and W multiples of ``2 ** (levels - 1)`` -> the features of every level, finest first."""
        features = []
        for level, stage in enumerate(self.levels):
            x = stage(x if level == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return features


class RegressorBaseline(nn.Module, Denoiser):
    """Base of the deterministic regressor baselines: the denoiser interface around a conditions-only net.

    Subclasses build their network in ``__init__`` (reading ``self.in_channels``) and implement
    :meth:`predict`, which maps the concatenated conditions on a grid padded to a multiple of
    :attr:`size_multiple` to the prediction on that grid. They have no gene graph: the co-expression
    matrix is ignored (:meth:`Denoiser.set_coexpression`).

    Parameters
    ----------
    cfg
        Model configuration.
    size_multiple
        The network's input sides must be multiples of this; inputs are zero-padded at the bottom/right
        and the prediction is cropped back.
    """

    def __init__(self, cfg: ModelConfig, size_multiple: int):
        super().__init__()
        self.cfg = cfg
        self.in_channels = cfg.n_genes + cfg.image_channels
        self.size_multiple = size_multiple

    def predict(self, inputs: Tensor) -> Tensor:
        """Map (B, N + C, H', W') conditions, H' and W' multiples of ``size_multiple``, to (B, out, H', W')."""
        raise NotImplementedError

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
        """Predict the HR target from the conditions alone.

        Parameters
        ----------
        x_t
            (B, N, H, W): only its shape is used (the HR grid); the values are ignored. Training with
            ``train.objective: regression`` passes zeros (:func:`~diffst.models.base.regress`).
        t
            (B,) timesteps: checked and ignored.
        lr
            (B, N, h, w) LR maps of the same tile.
        tissue
            (B, C, S, S) histology image in [0, 1].
        cells, cell_entropy, entropy_threshold
            Accepted for a uniform interface and ignored.

        Returns
        -------
        DenoiserOutput
            ``prediction`` (B, cfg.out_channels, H, W), no auxiliary losses.
        """
        check_inputs(x_t, t, lr, tissue, self.cfg.n_genes, self.cfg.image_channels)
        height, width = x_t.shape[-2:]
        inputs = regressor_inputs(lr, tissue, (height, width))
        m = self.size_multiple
        pad_h, pad_w = -height % m, -width % m
        # Zero padding at the bottom/right keeps pixel (0, 0) aligned across levels (as ConditionalUNet).
        inputs = F.pad(inputs, (0, pad_w, 0, pad_h))
        return DenoiserOutput(prediction=self.predict(inputs)[..., :height, :width])


@register_model("unet")
class UNetRegressor(RegressorBaseline):
    """Plain U-Net regressor: conditions in, HR maps out.

    Encoder levels of ``num_res_blocks`` double-convolutions with 2x2 max-pooling between them, the
    deepest level as bottleneck; each decoder level upsamples (2x2 transposed convolution), concatenates
    the encoder's skip at that level and applies one double-convolution; a 1x1 convolution gives the
    output. See the module docstring for the sizes and the ignored inputs.

    Parameters
    ----------
    cfg
        Model configuration (``n_genes``, ``image_channels``, ``base_channels``, ``channel_mult``,
        ``num_res_blocks``, ``dropout``, ``learn_sigma``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, size_multiple=2 ** (len(cfg.channel_mult) - 1))
        widths = level_widths(cfg)
        self.encoder = Encoder(self.in_channels, widths, cfg.num_res_blocks, cfg.dropout)
        self.upsamples = nn.ModuleList(upsample2x(widths[i + 1], widths[i]) for i in range(len(widths) - 1))
        self.decoder = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], cfg.dropout) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)

    def predict(self, inputs: Tensor) -> Tensor:
        """See :meth:`RegressorBaseline.predict`."""
        skips = self.encoder(inputs)
        h = skips.pop()  # the bottleneck
        for level in reversed(range(len(self.decoder))):
            h = self.decoder[level](torch.cat([skips.pop(), self.upsamples[level](h)], dim=1))
        return self.head(h)
