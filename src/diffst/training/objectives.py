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
from diffst.runs import DatasetSpec, Run, regression_output

__all__ = ["Objective", "DiffusionObjective", "RegressionObjective", "SpotPoissonObjective", "make_objective"]


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


class SpotPoissonObjective:
    """Spot-ratio regression (``train.regression: spot_poisson``): Poisson deviance of the HR counts.

    The model's output shares each LR spot's count out over its bins (:func:`~diffst.runs.regression_output`),
    so only where the counts go inside a spot is learned, never how many there are. The deviance of each
    gene is divided by the gene's mean HR count in the batch, so that every gene weighs alike whatever its
    expression level (as the per-gene correlation the benchmark reports does). Bins of unmeasured LR spots
    (``lr_mask`` False) do not count.

    Parameters
    ----------
    config
        The run configuration (``train.disentangle_weight``).
    dataset
        The training data's :class:`~diffst.runs.DatasetSpec` (normaliser and scale).
    """

    terms = ("deviance", "disentangle")
    val_terms = {"loss": "deviance"}

    def __init__(self, config: RunConfig, dataset: DatasetSpec):
        self.config = config
        self.dataset = dataset
        self.aux_weight = config.train.disentangle_weight

    def __call__(self, model, batch, entropy_threshold, generator, device):
        """See :class:`Objective` (``generator`` is unused: the objective draws nothing)."""
        cond = Conditions.from_batch(batch, entropy_threshold).to(device, non_blocking=True)
        hr = batch["hr"].to(device, non_blocking=True)
        out = regression_output(model, cond, tuple(hr.shape), self.config, self.dataset)
        observed = self.dataset.normaliser.to_counts(hr)
        scale = self.dataset.geometry.scale
        mask = batch["lr_mask"].to(device).repeat_interleave(scale, -2).repeat_interleave(scale, -1)
        mask = mask[:, None].to(hr.dtype)
        deviance = poisson_deviance(observed, out.counts)
        weight = 1.0 / ((observed * mask).sum(dim=(0, 2, 3)) / mask.sum().clamp_min(1.0) + 0.1)
        loss = (deviance * mask * weight[None, :, None, None]).sum() / (mask.sum().clamp_min(1.0) * hr.shape[1])
        return _with_aux(loss, {"deviance": loss, **out.aux_losses}, self.aux_weight)


def poisson_deviance(observed: Tensor, expected: Tensor, eps: float = 1e-6) -> Tensor:
    """Half the Poisson deviance per bin, y log(y / mu) - (y - mu): zero where mu = y, never negative."""
    return torch.xlogy(observed, observed) - observed * torch.log(expected + eps) - (observed - expected)


def _with_aux(loss: Tensor, terms: dict[str, Tensor], weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    if "disentangle" in terms:
        loss = loss + weight * terms["disentangle"]
    return loss, terms


def make_objective(cfg: RunConfig, base: Run | None = None,
                   dataset: DatasetSpec | None = None) -> DiffusionObjective | RegressionObjective | SpotPoissonObjective:
    """Make the objective ``cfg.train.objective`` names, set up from ``cfg``.

    Parameters
    ----------
    cfg
        The run configuration (``train.objective``, ``train.disentangle_weight``, ``diffusion``).
    base
        The loaded frozen regression run (:func:`diffst.runs.load_base_run`) of a ``regression_residual``
        target; None otherwise.
    dataset
        The training data's description (``spot_poisson`` regression needs its normaliser and scale).

    Returns
    -------
    DiffusionObjective, RegressionObjective or SpotPoissonObjective
    """
    weight = cfg.train.disentangle_weight
    if cfg.train.objective == "regression" and cfg.train.regression == "spot_poisson":
        if dataset is None:
            raise ValueError("train.regression: spot_poisson needs the training data's description")
        return SpotPoissonObjective(cfg, dataset)
    if cfg.train.objective == "regression":
        return RegressionObjective(cfg.diffusion.target, weight, base)
    return DiffusionObjective(GaussianDiffusion(cfg.diffusion), weight, base)
