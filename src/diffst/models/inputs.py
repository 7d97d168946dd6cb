"""Shape checks shared by the denoisers, so a wrong input fails with a message instead of deep inside a conv."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from diffst.errors import InputError

__all__ = ["check_inputs", "resample_lr"]


def resample_lr(lr: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample LR maps (B, N, h, w) onto an HR grid of ``size`` with bicubic interpolation.

    The LR tile is assumed to cover the same tissue extent as the HR tile; no integer scale factor
    between them is assumed (the paper's LR is 26 x 26 for a 256 x 256 HR grid).
    """
    if tuple(lr.shape[-2:]) == tuple(size):
        return lr
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False)


def check_inputs(
    x_t: Tensor,
    t: Tensor,
    lr: Tensor,
    tissue: Tensor,
    n_genes: int,
    image_channels: int,
    cells: Tensor | None = None,
    cell_entropy: Tensor | None = None,
) -> None:
    """Raise ``InputError`` unless the inputs have the shapes a denoiser of this configuration expects."""
    if x_t.ndim != 4 or x_t.shape[1] != n_genes:
        raise InputError(f"x_t must be (B, {n_genes}, H, W), got {tuple(x_t.shape)}")
    batch = x_t.shape[0]
    if t.numel() not in (1, batch):
        raise InputError(f"t must hold 1 or B={batch} timesteps, got shape {tuple(t.shape)}")
    if lr.ndim != 4 or lr.shape[:2] != (batch, n_genes):
        raise InputError(f"lr must be ({batch}, {n_genes}, h, w), got {tuple(lr.shape)}")
    if tissue.ndim != 4 or tissue.shape[:2] != (batch, image_channels):
        raise InputError(
            f"tissue must be ({batch}, {image_channels}, S, S) (image_channels={image_channels} in the "
            f"model config), got {tuple(tissue.shape)}"
        )
    if cells is not None:
        if cells.ndim != 5 or cells.shape[:1] != (batch,) or cells.shape[2] != image_channels:
            raise InputError(f"cells must be ({batch}, M, {image_channels}, p, p), got {tuple(cells.shape)}")
        if cell_entropy is None or tuple(cell_entropy.shape) != tuple(cells.shape[:2]):
            shape = None if cell_entropy is None else tuple(cell_entropy.shape)
            raise InputError(f"cell_entropy must be {tuple(cells.shape[:2])} (one value per patch), got {shape}")
