"""Multi-modal disentangling and fusion (paper Sec. 2.2 part 3).

Each modality's features are split by 1x1 convolutions into a shared part S and a unique part U. The
loss ||S_y - S_h||_2 / (||U_y - U_h||_2 + eps) pulls the shared parts together and pushes the unique
parts apart. The fused condition is a 1x1 convolution of [mean shared part, U_y, U_h]. Without
disentangling the two maps are simply concatenated and fused by a 1x1 convolution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ModalityFusion", "disentangle_loss"]


def disentangle_loss(
    shared_y: Tensor, shared_h: Tensor, unique_y: Tensor, unique_h: Tensor, eps: float = 1e-6
) -> Tensor:
    """Batch mean of ||S_y - S_h||_2 / (||U_y - U_h||_2 + eps), norms taken per sample over all elements."""
    shared_gap = (shared_y - shared_h).flatten(1).norm(dim=1)
    unique_gap = (unique_y - unique_h).flatten(1).norm(dim=1)
    return (shared_gap / (unique_gap + eps)).mean()


class ModalityFusion(nn.Module):
    """Fuse ST and histology feature maps into one condition map.

    Parameters
    ----------
    channels
        Channels of each input map.
    out_channels
        Channels of the fused map.
    disentangle
        Split into shared/unique parts and report the ``"disentangle"`` loss.
    """

    def __init__(self, channels: int, out_channels: int, disentangle: bool = True):
        super().__init__()
        self.disentangle = disentangle
        if disentangle:
            self.shared_y = nn.Conv2d(channels, channels, 1)
            self.unique_y = nn.Conv2d(channels, channels, 1)
            self.shared_h = nn.Conv2d(channels, channels, 1)
            self.unique_h = nn.Conv2d(channels, channels, 1)
            self.fuse = nn.Conv2d(3 * channels, out_channels, 1)
        else:
            self.fuse = nn.Conv2d(2 * channels, out_channels, 1)

    def forward(self, feat_y: Tensor, feat_h: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, C, H, W) x 2 -> fused (B, out_channels, H, W) and the aux losses (possibly empty)."""
        if not self.disentangle:
            return self.fuse(torch.cat([feat_y, feat_h], dim=1)), {}
        s_y, u_y = self.shared_y(feat_y), self.unique_y(feat_y)
        s_h, u_h = self.shared_h(feat_h), self.unique_h(feat_h)
        fused = self.fuse(torch.cat([(s_y + s_h) / 2, u_y, u_h], dim=1))
        return fused, {"disentangle": disentangle_loss(s_y, s_h, u_y, u_h)}
