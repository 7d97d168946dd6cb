"""Training objectives: what one step optimises, given a model and a batch.

An objective is called as ``objective(model, batch, entropy_threshold, generator, device)`` and returns
``(loss, terms)``: the loss to minimise (including the model's weighted auxiliary losses) and scalar
terms to log. It declares the names of its terms (``terms``, the per-step metric columns besides
``loss``) and which of them validation reports (``val_terms``: validation column -> term).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.config import RunConfig
from diffst.diffusion.process import GaussianDiffusion
from diffst.diffusion.target import TargetKind, encode_target
from diffst.models.base import Conditions, regress
from diffst.runs import Run

__all__ = ["Objective", "DiffusionObjective", "RegressionObjective", "make_objective"]


class Objective(Protocol):
    """A training objective (see the module docstring)."""

    terms: tuple[str, ...]
    val_terms: Mapping[str, str]

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor], entropy_threshold: float | None,
                 generator: torch.Generator, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss of one batch and its terms (see the module docstring)."""
        ...


def _inputs(batch: Mapping[str, Tensor], entropy_threshold: float | None, target: TargetKind,
            device: torch.device, base: Run | None = None) -> tuple[Tensor, Conditions]:
    """Return the target x0 and the conditions of a batch, on ``device``.

    With a base run (``regression_residual``) its frozen prediction is computed from the same (augmented)
    batch, without gradients.
    """
    cond = Conditions.from_batch(batch, entropy_threshold).to(device, non_blocking=True)
    prior = base.predict_hr(batch, device) if base is not None else None
    return encode_target(batch["hr"].to(device, non_blocking=True), cond.lr, target, prior), cond


class DiffusionObjective:
    """The diffusion objective of :meth:`~diffst.diffusion.process.GaussianDiffusion.training_losses`.

    Timesteps and noise are drawn from the step's generator (on the CPU, so runs are reproducible on any
    device); the model's auxiliary losses are added with weight ``aux_weight``.

    Parameters
    ----------
    diffusion
        The diffusion process (its ``cfg.target`` says what x0 is).
    aux_weight
        Weight of the model's auxiliary losses (``train.disentangle_weight``).
    base
        The frozen regression run whose prediction x0 is the residual over (``regression_residual``).
    """

    terms = ("diffusion_loss", "eps_mse", "vlb", "disentangle")
    val_terms = {"loss": "diffusion_loss", "eps_mse": "eps_mse", "vlb": "vlb"}

    def __init__(self, diffusion: GaussianDiffusion, aux_weight: float, base: Run | None = None):
        self.diffusion = diffusion
        self.aux_weight = aux_weight
        self.base = base

    def __call__(self, model, batch, entropy_threshold, generator, device):
        """See :class:`Objective`."""
        hr = batch["hr"]
        t = self.diffusion.sample_timesteps(hr.shape[0], generator=generator)
        noise = torch.randn(hr.shape, generator=generator, dtype=hr.dtype)
        x0, cond = _inputs(batch, entropy_threshold, self.diffusion.cfg.target, device, self.base)
        terms = self.diffusion.training_losses(model, x0, t.to(device), noise=noise.to(device), model_kwargs=cond)
        terms["diffusion_loss"] = terms.pop("loss")
        return _with_aux(terms["diffusion_loss"], terms, self.aux_weight)


class RegressionObjective:
    """Plain regression: MSE in model space between the model's direct prediction and the target.

    The denoiser is called with x_t = 0 at t = 0 (:func:`~diffst.models.base.regress`) and predicts the
    target x0 (the HR maps, or their residual over interpolated LR) from the conditions alone.

    Parameters
    ----------
    target
        What x0 is (``diffusion.target``).
    aux_weight
        Weight of the model's auxiliary losses (``train.disentangle_weight``).
    base
        The frozen regression run of a ``regression_residual`` target.
    """

    terms = ("mse", "disentangle")
    val_terms = {"loss": "mse"}

    def __init__(self, target: TargetKind, aux_weight: float, base: Run | None = None):
        self.target = target
        self.aux_weight = aux_weight
        self.base = base

    def __call__(self, model, batch, entropy_threshold, generator, device):
        """See :class:`Objective` (``generator`` is unused: the objective draws nothing)."""
        x0, cond = _inputs(batch, entropy_threshold, self.target, device, self.base)
        out = regress(model, cond, tuple(x0.shape))
        mse = F.mse_loss(out.prediction, x0)
        return _with_aux(mse, {"mse": mse, **out.aux_losses}, self.aux_weight)


def _with_aux(loss: Tensor, terms: dict[str, Tensor], weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    if "disentangle" in terms:
        loss = loss + weight * terms["disentangle"]
    return loss, terms


def make_objective(cfg: RunConfig, base: Run | None = None) -> DiffusionObjective | RegressionObjective:
    """Make the objective ``cfg.train.objective`` names, set up from ``cfg``.

    Parameters
    ----------
    cfg
        The run configuration (``train.objective``, ``train.disentangle_weight``, ``diffusion``).
    base
        The loaded frozen regression run (:func:`diffst.runs.load_base_run`) of a ``regression_residual``
        target; None otherwise.

    Returns
    -------
    DiffusionObjective or RegressionObjective
    """
    weight = cfg.train.disentangle_weight
    if cfg.train.objective == "regression":
        return RegressionObjective(cfg.diffusion.target, weight, base)
    return DiffusionObjective(GaussianDiffusion(cfg.diffusion), weight, base)
