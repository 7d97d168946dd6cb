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

from diffst.diffusion.target import lr_on_hr_grid
from diffst.models.base import Denoiser, DenoiserOutput

__all__ = ["LinearPrior", "SpotRatioModel", "bin_image_features", "fit_linear_prior", "interpolated_shares"]

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


def prior_features(tissue: Tensor, hr_shape: tuple[int, int]) -> Tensor:
    """Compute the per-bin image statistics of :class:`LinearPrior` (the histology ridge's features).

    The mean and spread of every channel in each bin and their 3 x 3 and 7 x 7 neighbourhood means,
    unstandardised: (B, 2 C (1 + len(NEIGHBOURHOODS)), H, W).
    """
    mean = F.adaptive_avg_pool2d(tissue, hr_shape)
    std = (F.adaptive_avg_pool2d(tissue * tissue, hr_shape) - mean * mean).clamp_min(0.0).sqrt()
    stats = torch.cat([mean, std], dim=1)
    parts = [stats]
    for size in NEIGHBOURHOODS:
        parts.append(F.avg_pool2d(F.pad(stats, [size // 2] * 4, mode="replicate"), size, stride=1))
    return torch.cat(parts, dim=1)


def n_prior_features(image_channels: int) -> int:
    """Channels of :func:`prior_features` for an image of ``image_channels`` channels."""
    return 2 * image_channels * (1 + len(NEIGHBOURHOODS))


def n_image_features(image_channels: int) -> int:
    """Channels of :func:`bin_image_features` for an image of ``image_channels`` channels."""
    return STATS_PER_CHANNEL * image_channels * (1 + len(NEIGHBOURHOODS))


def _interpolated_log1p(lr: Tensor, hr_shape: tuple[int, int], log1p_scale: Tensor) -> Tensor:
    """log1p of the bicubic interpolation of counts per HR bin, from model-space LR maps.

    As the histology ridge (and the bicubic baseline) interpolate: in counts, clipped at zero; ``log1p_scale``
    is the normaliser's per-gene scale (model space -> log1p counts).
    """
    counts = torch.expm1((lr + 1.0) * 0.5 * log1p_scale.view(1, -1, 1, 1)).clamp_min(0.0)
    interpolated = F.interpolate(counts, size=tuple(hr_shape), mode="bicubic", align_corners=False)
    return torch.log1p(interpolated.clamp_min(0.0))


def interpolated_shares(lr_counts: Tensor, scale: int) -> Tensor:
    """Share each LR spot's count out in proportion to the LR counts interpolated in counts, empty spots left out.

    The allocation a spot-ratio answer is shrunk toward (``train.spot_ratio_shrink``): bin ``i`` of a spot
    gets a share proportional to ``1 + c_i``, with ``c`` the bicubic interpolation of the counts per bin,
    normalised over the LR spots that have a count in some gene, ``interp(counts * measured) /
    interp(measured)``: a spot without any count (unmeasured, or off the tissue) says that there is no
    tissue there, not that its neighbour's expression falls toward it. It knows nothing of the image, so it
    can be wrong only as far as the LR maps' own gradient; the same in every square symmetry.

    Parameters
    ----------
    lr_counts
        (B, N, h, w) non-negative LR counts.
    scale
        Super-resolution factor s.

    Returns
    -------
    Tensor
        (B, N, s h, s w) HR counts whose s x s blocks sum to ``lr_counts`` exactly.
    """
    from diffst.core.spots import share_out_spots

    size = (lr_counts.shape[-2] * scale, lr_counts.shape[-1] * scale)
    counts = lr_counts.clamp_min(0.0) / float(scale * scale)
    measured = (counts.sum(dim=1, keepdim=True) > 0).to(counts.dtype)
    total = F.interpolate(counts * measured, size=size, mode="bicubic", align_corners=False)
    # A lone measured spot's own bins sit at mask weight >= ~0.4 (the corners of a 10 x 10 spot), far above
    # the floor; it only matters inside empty ground, whose spots have no count to share.
    weight = F.interpolate(measured, size=size, mode="bicubic", align_corners=False).clamp_min(0.05)
    return share_out_spots(torch.log1p((total / weight).clamp_min(0.0)), lr_counts, scale)


class LinearPrior(nn.Module):
    """A per-gene ridge regression of log1p HR counts, fitted in closed form, as a spot-ratio model's start.

    ``log1p(HR) ~ c + w_b b + w_f . f + b (v_f . f)`` per gene, with ``b`` the log1p of the interpolated LR
    counts per bin and ``f`` the per-bin image statistics (:func:`bin_image_features`): the histology
    ridge's form (the benchmark's strongest simple baseline), on the features the model's image head uses.
    Its buffers are set once from the training tiles (:func:`fit_linear_prior`) and saved with the weights;
    nothing in it is trained.
    """

    def __init__(self, n_genes: int, n_features: int):
        super().__init__()
        self.register_buffer("intercept", torch.zeros(n_genes))
        self.register_buffer("w_lr", torch.zeros(n_genes))
        self.register_buffer("w_image", torch.zeros(n_genes, n_features))
        self.register_buffer("w_product", torch.zeros(n_genes, n_features))
        self.register_buffer("log1p_scale", torch.ones(n_genes))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def set(self, coefficients: dict[str, Tensor]) -> None:
        """Copy fitted coefficients (:func:`fit_linear_prior`) into the buffers."""
        for name, value in coefficients.items():
            getattr(self, name).copy_(torch.as_tensor(value, dtype=getattr(self, name).dtype))
        self.fitted.fill_(True)

    def forward(self, lr: Tensor, feats: Tensor) -> Tensor:
        """Log-weights of the HR bins relative to the default prior ``b``: ``log(expm1(ridge)) - b``, (B, N, H, W).

        Zero until fitted, so an unfitted prior changes nothing.
        """
        if not bool(self.fitted):
            return torch.zeros((lr.shape[0], lr.shape[1], *feats.shape[-2:]), dtype=feats.dtype, device=feats.device)
        hr_shape = tuple(feats.shape[-2:])
        b = _interpolated_log1p(lr, hr_shape, self.log1p_scale)
        image = torch.einsum("nf,bfhw->bnhw", self.w_image, feats)
        product = torch.einsum("nf,bfhw->bnhw", self.w_product, feats)
        pred = self.intercept.view(1, -1, 1, 1) + self.w_lr.view(1, -1, 1, 1) * b + image + b * product
        # Counts expm1(pred) (as the ridge predicts them) become softmax log-weights (the floor keeps a bin the
        # ridge calls empty a small share), minus the default prior that the spot-ratio output adds back
        # (diffst.runs.regression_output: log1p counts of the LR maps interpolated in model space).
        default = (lr_on_hr_grid(lr, hr_shape) + 1.0) * 0.5 * self.log1p_scale.view(1, -1, 1, 1)
        return torch.log(torch.expm1(pred.clamp(0.0, 20.0)) + 0.01) - default


@torch.no_grad()
def fit_linear_prior(batches, log1p_scale: Tensor, n_features: int, alpha: float = 10.0) -> dict[str, Tensor]:
    """Fit :class:`LinearPrior` in closed form, one ridge per gene, from training tiles streamed in batches.

    Parameters
    ----------
    batches
        Iterable of dicts with ``lr`` (B, N, h, w) model-space LR, ``tissue`` (B, C, S, S) in [0, 1],
        ``hr_counts`` (B, N, H, W) observed counts and ``mask`` (B, H, W) bool: the bins to learn from
        (measured HR bins under measured LR spots).
    log1p_scale
        (N,) the normaliser's per-gene scale (model space -> log1p counts).
    n_features
        Channels of :func:`prior_features`.
    alpha
        Ridge penalty on standardised features (the intercept is not penalised).

    Returns
    -------
    dict
        The buffers of :class:`LinearPrior` (coefficients on unstandardised features).
    """
    n_genes = int(log1p_scale.numel())
    p = 2 + 2 * n_features
    gram = torch.zeros(n_genes, p, p, dtype=torch.float64)
    xty = torch.zeros(n_genes, p, dtype=torch.float64)
    total = torch.zeros(n_genes, p, dtype=torch.float64)
    count = 0.0
    for batch in batches:
        hr = batch["hr_counts"].to(torch.float64)
        feats = prior_features(batch["tissue"].float(), tuple(hr.shape[-2:])).to(torch.float64)
        b = _interpolated_log1p(batch["lr"].float(), tuple(hr.shape[-2:]), log1p_scale.float()).to(torch.float64)
        keep = batch["mask"].to(torch.bool)
        if not keep.any():
            continue
        f = feats.permute(0, 2, 3, 1)[keep]  # (M, F)
        for g in range(n_genes):
            bg = b[:, g][keep][:, None]
            x = torch.cat([torch.ones_like(bg), bg, f, f * bg], dim=1)
            y = torch.log1p(hr[:, g][keep])
            gram[g] += x.T @ x
            xty[g] += x.T @ y
            total[g] += x.sum(dim=0)
        count += float(keep.sum())
    if count < 2:
        raise ValueError("the linear prior needs measured training bins; none were found")
    coef = torch.zeros(n_genes, p, dtype=torch.float64)
    for g in range(n_genes):
        mean = total[g] / count
        var = (torch.diagonal(gram[g]) / count - mean * mean).clamp_min(0.0)
        spread = var.sqrt()
        spread[spread < 1e-8] = 1.0
        mean[0], spread[0] = 0.0, 1.0
        # Gram and cross products of the standardised features, from the raw sums.
        centred = gram[g] - count * torch.outer(mean, mean)
        centred[0, :] = total[g] - count * mean
        centred[:, 0] = total[g] - count * mean
        centred[0, 0] = count
        ztz = centred / torch.outer(spread, spread)
        y_sum = xty[g][0]
        zty = (xty[g] - mean * y_sum) / spread
        zty[0] = y_sum
        penalty = torch.full((p,), float(alpha), dtype=torch.float64)
        penalty[0] = 0.0
        w = torch.linalg.solve(ztz + torch.diag(penalty), zty)
        raw = w / spread
        raw[0] = w[0] - (raw[1:] * mean[1:]).sum()
        coef[g] = raw
    f0 = 2
    return {"intercept": coef[:, 0].float(), "w_lr": coef[:, 1].float(),
            "w_image": coef[:, f0:f0 + n_features].float(), "w_product": coef[:, f0 + n_features:].float(),
            "log1p_scale": log1p_scale.float()}


class SpotRatioModel(nn.Module, Denoiser):
    """A backbone denoiser plus a per-gene linear map of :func:`bin_image_features` (zero at the start).

    Parameters
    ----------
    backbone
        Any registered denoiser (Diff-ST, a baseline), called as usual; its first N output channels are
        the backbone's log-weights.
    n_genes, image_channels
        N and C.
    linear_prior
        Add a :class:`LinearPrior` (fitted from the training tiles before training, see
        ``train.linear_prior``): the model then starts from the histology ridge's answer and learns around it.
    """

    def __init__(self, backbone: nn.Module, n_genes: int, image_channels: int, linear_prior: bool = False):
        super().__init__()
        self.backbone = backbone
        self.n_genes = n_genes
        n_features = n_image_features(image_channels)
        self.image_head = nn.Conv2d(n_features, n_genes, 1)
        nn.init.zeros_(self.image_head.weight)
        nn.init.zeros_(self.image_head.bias)
        self.linear_prior = LinearPrior(n_genes, n_prior_features(image_channels)) if linear_prior else None

    def forward(self, x_t: Tensor, t: Tensor, **conditions) -> DenoiserOutput:
        """Backbone log-weights plus the image head's (and the linear prior's), (B, N, H, W)."""
        out = self.backbone(x_t, t, **conditions)
        feats = bin_image_features(conditions["tissue"], tuple(x_t.shape[-2:]))
        weights = out.prediction[:, : self.n_genes] + self.image_head(feats)
        if self.linear_prior is not None:
            weights = weights + self.linear_prior(conditions["lr"], prior_features(conditions["tissue"],
                                                                                    tuple(x_t.shape[-2:])))
        return DenoiserOutput(weights, out.aux_losses)

    def set_linear_prior(self, coefficients: dict[str, Tensor]) -> None:
        """Set the fitted :class:`LinearPrior` (:func:`fit_linear_prior`)."""
        if self.linear_prior is None:
            raise ValueError("this model was built without a linear prior (train.linear_prior: false)")
        self.linear_prior.set(coefficients)

    def set_coexpression(self, matrix) -> None:
        """Pass the co-expression matrix on to the backbone."""
        self.backbone.set_coexpression(matrix)
