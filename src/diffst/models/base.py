"""What every denoiser returns. Models know nothing about the diffusion process: they map
(noisy HR maps, timestep, conditions) to a prediction, plus any auxiliary losses of their own."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DenoiserOutput:
    """Output of a denoiser's forward pass.

    prediction: (B, N, H, W) epsilon, or (B, 2N, H, W) when the model also predicts the variance
        interpolation values v (learned sigma): the first N channels are epsilon, the last N are v.
    aux_losses: unweighted auxiliary losses of the model itself (e.g. ``"disentangle"``); the training
        loop weights them.
    """

    prediction: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
