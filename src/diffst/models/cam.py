"""Cross-modal adaptive modulation (CAM, paper Sec. 2.2 part 3, Fig. 2b).

Both feature maps (ST features y and histology features h, same size) are cut into a x a windows. In
each window the cross-modal affinity A_y^T A_h (a^2 x a^2: one row per y pixel, one column per h pixel)
passes a fully connected layer and a softmax; the resulting spatial mixing matrix says, for every y
pixel, how to combine the h pixels of the window, and the mixed h features are added to y
(histology -> ST). The ST -> histology direction uses the transposed affinity and its own layers.

Maps not divisible by a are zero-padded, padded pixels are masked out of the softmax and cropped away.
When a map is smaller than a the window shrinks to the map, using the sub-block of the fully connected
layer that belongs to the window's pixel positions (identical to padding the window and masking).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.models.unet import group_norm

__all__ = ["CrossModalAdaptiveModulation"]


def _to_windows(x: Tensor, win_h: int, win_w: int) -> Tensor:
    """(B, C, H, W) with H, W multiples of the window -> (B * n_windows, win_h * win_w, C)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // win_h, win_h, w // win_w, win_w)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, win_h * win_w, c)


def _from_windows(x: Tensor, b: int, h: int, w: int, win_h: int, win_w: int) -> Tensor:
    """Inverse of ``_to_windows``."""
    c = x.shape[-1]
    x = x.reshape(b, h // win_h, w // win_w, win_h, win_w, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class _Direction(nn.Module):
    """One modulation direction: a filter from the affinity, applied to the source modality's window."""

    def __init__(self, channels: int, window: int):
        super().__init__()
        area = window * window
        self.fc = nn.Linear(area, area)
        # Identity start: the filter begins as plain softmax attention over the affinity.
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(area))
            self.fc.bias.zero_()
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def mixing(self, target_keys: Tensor, source_keys: Tensor, scale: float, positions: Tensor | None,
               key_valid: Tensor) -> Tensor:
        """FC + softmax over the source pixels of the affinity ``scale * target_keys @ source_keys^T``.

        Parameters
        ----------
        target_keys, source_keys
            (Bw, P, d) projections of the modality being updated (rows) and of the one mixed in (columns).
        scale
            Factor of the affinity.
        positions
            Indices of the window's pixels in the full ``window x window`` layout when the window shrank.
        key_valid
            (Bw, P) bool: source pixels inside the map.

        Returns
        -------
        Tensor
            (Bw, P, P) mixing weights, rows summing to one.
        """
        weight, bias = self.fc.weight, self.fc.bias
        if positions is not None:
            weight, bias = weight[positions][:, positions], bias[positions]
        # FC(affinity) = scale * T (W S)^T + b: the affinity has rank d << P, so applying W to the source keys
        # first costs 2 P^2 d instead of P^3 multiply-adds per window (4x fewer at P = 1024, d = 128).
        mixed_keys = torch.matmul(weight, source_keys)  # (Bw, P, d)
        logits = torch.baddbmm(bias.expand(target_keys.shape[0], 1, -1), target_keys, mixed_keys.transpose(1, 2),
                               alpha=scale)
        logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
        return logits.softmax(dim=-1)


class CrossModalAdaptiveModulation(nn.Module):
    """Bidirectional window-based modulation between ST and histology feature maps.

    Parameters
    ----------
    channels
        Channels of both feature maps.
    window
        Window side a (paper: 32).
    d_affinity
        Channels of the projections used to compute the affinity.
    """

    def __init__(self, channels: int, window: int, d_affinity: int):
        super().__init__()
        self.window = window
        self.norm_y = group_norm(channels)
        self.norm_h = group_norm(channels)
        self.key_y = nn.Conv2d(channels, d_affinity, 1)
        self.key_h = nn.Conv2d(channels, d_affinity, 1)
        self.scale = 1.0 / math.sqrt(d_affinity)
        self.hist_to_st = _Direction(channels, window)
        self.st_to_hist = _Direction(channels, window)

    def forward(self, feat_y: Tensor, feat_h: Tensor) -> tuple[Tensor, Tensor]:
        """Modulate each modality by the other.

        Parameters
        ----------
        feat_y, feat_h
            (B, C, H, W) ST and histology feature maps on the same grid.

        Returns
        -------
        tuple of Tensor
            Updated (feat_y, feat_h), same shapes.
        """
        b, _, height, width = feat_y.shape
        win_h, win_w = min(self.window, height), min(self.window, width)
        pad_h, pad_w = (-height) % win_h, (-width) % win_w
        full_h, full_w = height + pad_h, width + pad_w
        positions = None
        if (win_h, win_w) != (self.window, self.window):
            rows = torch.arange(win_h, device=feat_y.device)[:, None] * self.window
            positions = (rows + torch.arange(win_w, device=feat_y.device)[None]).reshape(-1)

        def windows(x: Tensor) -> Tensor:
            return _to_windows(F.pad(x, (0, pad_w, 0, pad_h)), win_h, win_w)

        keys_y = windows(self.key_y(self.norm_y(feat_y)))
        keys_h = windows(self.key_h(self.norm_h(feat_h)))
        valid = torch.ones(1, 1, height, width, device=feat_y.device, dtype=feat_y.dtype)
        area = win_h * win_w
        valid = windows(valid).reshape(1, -1, area).expand(b, -1, -1).reshape(-1, area).bool()

        # The affinity A_y^T A_h (rows: y pixels, columns: h pixels) is never formed: see _Direction.mixing.
        mix_h2y = self.hist_to_st.mixing(keys_y, keys_h, self.scale, positions, valid)
        mix_y2h = self.st_to_hist.mixing(keys_h, keys_y, self.scale, positions, valid)

        values_h = windows(self.hist_to_st.value(feat_h))
        values_y = windows(self.st_to_hist.value(feat_y))
        update_y = _from_windows(mix_h2y @ values_h, b, full_h, full_w, win_h, win_w)[..., :height, :width]
        update_h = _from_windows(mix_y2h @ values_y, b, full_h, full_w, win_h, win_w)[..., :height, :width]
        return feat_y + self.hist_to_st.out(update_y), feat_h + self.st_to_hist.out(update_h)
