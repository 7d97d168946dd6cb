"""Conditional U-Net backbone in the style of guided-diffusion (Dhariwal & Nichol 2021).

Timestep embedding, residual blocks with scale-shift GroupNorm, multi-head self-attention at chosen
levels, skip connections. Conditions enter as extra input channels and, optionally, as feature maps
added at one encoder level (``injections``). Inputs of any size are padded internally to a multiple of
``2 ** (levels - 1)`` and the output is cropped back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "timestep_embedding",
    "group_norm",
    "ResBlock",
    "SelfAttention2d",
    "ConditionalUNet",
    "attention_levels_for",
]


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels``."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Parameters
    ----------
    t
        (B,) timesteps, integer or float.
    dim
        Embedding size.

    Returns
    -------
    Tensor
        (B, dim) float embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding through scale-shift normalisation."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """(B, C_in, H, W) features and (B, E) timestep embedding -> (B, C_out, H, W)."""
        h = self.in_layers(x)
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over all pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W): x plus attention over its H * W pixels."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        # (B, 3, heads, L, c/heads) for scaled_dot_product_attention
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
        out = out.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class _Level(nn.Module):
    """Blocks of one U-Net level (encoder or decoder side)."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)


class ConditionalUNet(nn.Module):
    """Guided-diffusion-style U-Net mapping (input maps, timestep) to output maps.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the (already concatenated) input and of the prediction.
    base_channels, channel_mult, num_res_blocks
        Width of level 0, per-level multipliers, residual blocks per encoder level.
    attention_levels
        Levels (0 = full resolution) with self-attention; the middle block always has attention.
    num_heads, dropout
        Self-attention heads and residual-block dropout.
    injection_channels
        ``{level: channels}`` of feature maps that may be added at the start of that encoder level;
        each goes through its own 1x1 projection to the level's width.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: set[int],
        num_heads: int,
        dropout: float = 0.0,
        injection_channels: dict[int, int] | None = None,
    ):
        super().__init__()
        self.num_levels = len(channel_mult)
        self.base_channels = base_channels
        emb_channels = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        injection_channels = injection_channels or {}
        widths = [base_channels * m for m in channel_mult]
        # The injection enters at the start of a level, where the width is still the previous level's.
        entry_widths = [base_channels] + widths[:-1]
        self.injections = nn.ModuleDict(
            {str(lv): nn.Conv2d(ch, entry_widths[lv], 1) for lv, ch in injection_channels.items()}
        )

        skip_widths = [base_channels]
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        width = base_channels
        for level, level_width in enumerate(widths):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, level_width, emb_channels, dropout))
                width = level_width
                attns.append(
                    SelfAttention2d(width, num_heads) if level in attention_levels else nn.Identity()
                )
                skip_widths.append(width)
            self.down_levels.append(_Level(blocks, attns))
            if level < self.num_levels - 1:
                self.downsamples.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)

        self.mid_block1 = ResBlock(width, width, emb_channels, dropout)
        self.mid_attention = SelfAttention2d(width, num_heads)
        self.mid_block2 = ResBlock(width, width, emb_channels, dropout)

        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(width + skip_widths.pop(), widths[level], emb_channels, dropout))
                width = widths[level]
                attns.append(
                    SelfAttention2d(width, num_heads) if level in attention_levels else nn.Identity()
                )
            self.up_levels.append(_Level(blocks, attns))
            if level > 0:
                self.upsamples.append(nn.Conv2d(width, width, 3, padding=1))

        self.out = nn.Sequential(
            group_norm(width), nn.SiLU(), zero_init(nn.Conv2d(width, out_channels, 3, padding=1))
        )

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of this."""
        return 2 ** (self.num_levels - 1)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size after internal padding."""
        m = self.size_multiple
        return -(-height // m) * m, -(-width // m) * m

    def forward(self, x: Tensor, t: Tensor, injections: dict[int, Tensor] | None = None) -> Tensor:
        """Run the U-Net.

        Parameters
        ----------
        x
            (B, in_channels, H, W), any H and W.
        t
            (B,) timesteps (long or float).
        injections
            ``{level: (B, C_level, H_pad / 2**level, W_pad / 2**level)}`` maps on the padded grid
            (see ``padded_size``), added at the start of that encoder level.

        Returns
        -------
        Tensor
            (B, out_channels, H, W).
        """
        height, width = x.shape[-2:]
        pad_h, pad_w = self.padded_size(height, width)
        # Zero padding at the bottom/right keeps pixel (0, 0) aligned across levels.
        x = F.pad(x, (0, pad_w - width, 0, pad_h - height))
        injections = injections or {}
        emb = self.time_embed(timestep_embedding(t.reshape(-1), self.base_channels).to(x.dtype))
        if emb.shape[0] == 1 and x.shape[0] > 1:
            emb = emb.expand(x.shape[0], -1)

        h = self.input_conv(x)
        skips = [h]
        for level, stage in enumerate(self.down_levels):
            if level in injections:
                h = h + self.injections[str(level)](injections[level])
            for block, attn in zip(stage.blocks, stage.attentions, strict=True):
                h = attn(block(h, emb))
                skips.append(h)
            if level < self.num_levels - 1:
                h = self.downsamples[level](h)
                skips.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)

        for i, stage in enumerate(self.up_levels):
            for block, attn in zip(stage.blocks, stage.attentions, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < self.num_levels - 1:
                h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))

        return self.out(h)[..., :height, :width]


def attention_levels_for(attention_resolutions: tuple[int, ...], hr_size: int, num_levels: int) -> set[int]:
    """Translate guided-diffusion attention resolutions (feature-map sizes at ``hr_size``) into levels."""
    return {lv for lv in range(num_levels) if hr_size // 2**lv in set(attention_resolutions)}
