"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """A frozen copy of a model whose weights track an exponential moving average of the live weights.

    ``ema = decay * ema + (1 - decay) * weights`` after every optimiser step; buffers (e.g. the
    co-expression matrix) are copied. With ``warmup`` the decay at update n is
    ``min(decay, (1 + n) / (10 + n))``.

    Parameters
    ----------
    model
        The live model (not wrapped by DDP).
    decay
        Target decay in [0, 1).
    warmup
        Ramp the decay up during the first updates.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay used by the next update."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        decay = self.current_decay()
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the averaged weights, with the same keys as the model's ``state_dict``."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore averaged weights and the update counter."""
        self.model.load_state_dict(state)
        self.num_updates = int(num_updates)
