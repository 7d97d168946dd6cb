"""The image head of a spot-ratio regression: per-bin image statistics, linearly, on top of any backbone.

A spot-ratio regression (``train.regression: spot_poisson``) only decides where inside each LR spot the
spot's counts go. Much of that is written in the image bin by bin (how many nuclei, how dense), which a
per-gene linear map of a few standardised per-bin statistics (stain level and spread, and a nucleus-scale
band-pass: explicit nucleus evidence) captures with a handful of parameters,
like the histology ridge does; the backbone adds what needs context. The statistics are standardised
within each tile, so a brighter stain or another scanner shifts nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.models.base import Denoiser, DenoiserOutput

__all__ = ["SpotRatioModel", "bin_image_features"]

NEIGHBOURHOODS = (3, 7)
#: Gaussian widths (pixels of the tile image) of the band-pass that finds nucleus-sized blobs: at the cpu
#: preset's 1.56 µm/px, structures of about 3-10 µm (nuclei, bright in DAPI and dark in H&E).
BLOB_SIGMAS_PX = (1.0, 3.0)
#: Per-bin statistics per image channel: mean, spread, band-pass maximum, minimum and mean positive part.
STATS_PER_CHANNEL = 5


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with replicated borders."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, [radius] * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def bin_image_features(tissue: Tensor, hr_shape: tuple[int, int]) -> Tensor:
    """Standardised per-bin image statistics of a batch of tiles.

    Parameters
    ----------
    tissue
        (B, C, S, S) tissue images in [0, 1].
    hr_shape
        (H, W) of the HR grid.

    Returns
    -------
    Tensor
        (B, STATS_PER_CHANNEL * C * (1 + len(NEIGHBOURHOODS)), H, W): per channel and bin, the mean and
        standard deviation of the image and the maximum, minimum and mean positive part of its nucleus-scale
        band-pass (difference of Gaussians, :data:`BLOB_SIGMAS_PX`); then their means over 3 x 3 and 7 x 7
        bins; each standardised over the tile's bins (so stain strength and offset change nothing).
    """
    mean = F.adaptive_avg_pool2d(tissue, hr_shape)
    std = (F.adaptive_avg_pool2d(tissue * tissue, hr_shape) - mean * mean).clamp_min(0.0).sqrt()
    band = _gaussian_blur(tissue, BLOB_SIGMAS_PX[0]) - _gaussian_blur(tissue, BLOB_SIGMAS_PX[1])
    stats = torch.cat([mean, std, F.adaptive_max_pool2d(band, hr_shape), -F.adaptive_max_pool2d(-band, hr_shape),
                       F.adaptive_avg_pool2d(band.clamp_min(0.0), hr_shape)], dim=1)
    parts = [stats]
    for size in NEIGHBOURHOODS:
        padded = F.pad(stats, [size // 2] * 4, mode="replicate")
        parts.append(F.avg_pool2d(padded, size, stride=1))
    feats = torch.cat(parts, dim=1)
    centre = feats.mean(dim=(-2, -1), keepdim=True)
    spread = feats.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    return (feats - centre) / spread


class SpotRatioModel(nn.Module, Denoiser):
    """A backbone denoiser plus a per-gene linear map of :func:`bin_image_features` (zero at the start).

    Parameters
    ----------
    backbone
        Any registered denoiser (Diff-ST, a baseline), called as usual; its first N output channels are
        the backbone's log-weights.
    n_genes, image_channels
        N and C.
    """

    def __init__(self, backbone: nn.Module, n_genes: int, image_channels: int):
        super().__init__()
        self.backbone = backbone
        self.n_genes = n_genes
        self.image_head = nn.Conv2d(STATS_PER_CHANNEL * image_channels * (1 + len(NEIGHBOURHOODS)), n_genes, 1)
        nn.init.zeros_(self.image_head.weight)
        nn.init.zeros_(self.image_head.bias)

    def forward(self, x_t: Tensor, t: Tensor, **conditions) -> DenoiserOutput:
        """Backbone log-weights plus the image head's, (B, N, H, W)."""
        out = self.backbone(x_t, t, **conditions)
        feats = bin_image_features(conditions["tissue"], tuple(x_t.shape[-2:]))
        return DenoiserOutput(out.prediction[:, : self.n_genes] + self.image_head(feats), out.aux_losses)

    def set_coexpression(self, matrix) -> None:
        """Pass the co-expression matrix on to the backbone."""
        self.backbone.set_coexpression(matrix)
