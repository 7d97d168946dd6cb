"""Invertible map between counts and the model's space.

Model space is ``x = 2 * log1p(c) / m_g - 1`` per gene g, where ``c`` is counts per HR bin and ``m_g``
is fitted on the training tiles only (the largest log1p HR count of that gene, at least log(2)).
Training HR maps then lie in [-1, 1], the range the diffusion model is built for; test maps may
exceed it slightly and still invert exactly. LR maps hold s x s times more counts per bin, so they
are first divided by s² (counts per HR bin) and share the same transform: LR and HR are then on
one scale, and upsampled LR is a direct guess of HR.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel

from diffst.errors import InputError


class LogScaleNormaliser(BaseModel):
    """Per-gene log1p scaling. ``scale`` holds m_g for each gene in order."""

    kind: str = "log1p_scaled"
    genes: list[str]
    scale: list[float]

    @classmethod
    def fit(cls, hr_counts: np.ndarray, genes: list[str]) -> LogScaleNormaliser:
        """Fit on training HR counts of shape (T, N, H, W) (or LR densities for spot-only data)."""
        hr_counts = np.asarray(hr_counts)
        if hr_counts.ndim != 4 or hr_counts.shape[1] != len(genes):
            raise InputError(f"Expected training counts (tiles, {len(genes)} genes, H, W), got {hr_counts.shape}.")
        if hr_counts.shape[0] == 0:
            raise InputError("No training tiles to fit the normalisation on; check the split and the tissue filter.")
        if not np.all(np.isfinite(hr_counts)) or hr_counts.min() < 0:
            raise InputError("Training counts contain NaN, infinite or negative values; expected raw counts.")
        top = np.log1p(hr_counts.max(axis=(0, 2, 3)))
        return cls(genes=list(genes), scale=[float(v) for v in np.maximum(top, np.log(2.0))])

    def _scale(self, like) -> np.ndarray | torch.Tensor:
        s = np.asarray(self.scale, dtype=np.float32).reshape(-1, 1, 1)
        if isinstance(like, torch.Tensor):
            return torch.as_tensor(s, device=like.device, dtype=like.dtype)
        return s

    def to_model(self, counts_per_hr_bin):
        """Map counts per HR bin, (..., N, H, W), to model space."""
        log = torch.log1p(counts_per_hr_bin) if isinstance(counts_per_hr_bin, torch.Tensor) else np.log1p(counts_per_hr_bin)
        return 2.0 * log / self._scale(counts_per_hr_bin) - 1.0

    def to_counts(self, model_values):
        """Model space (..., N, H, W) -> counts per HR bin (never negative)."""
        log = (model_values + 1.0) * 0.5 * self._scale(model_values)
        if isinstance(model_values, torch.Tensor):
            return torch.expm1(log).clamp_min(0.0)
        return np.maximum(np.expm1(log), 0.0)

    def to_log1p(self, model_values):
        """Model space (..., N, H, W) -> log1p of counts per HR bin (the log scale before per-gene scaling)."""
        return (model_values + 1.0) * 0.5 * self._scale(model_values)

    def lr_to_counts(self, lr_model, scale: int):
        """Model-space LR maps -> LR counts (s x s HR bins each): the inverse of :meth:`lr_to_model`."""
        return self.to_counts(lr_model) * float(scale * scale)

    def lr_to_model(self, lr_counts, scale: int):
        """LR counts (s x s HR bins each) -> model space, via counts per HR bin."""
        return self.to_model(lr_counts / float(scale * scale))
