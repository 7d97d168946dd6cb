"""Training objectives: what one step optimises, given a model and a batch.

An objective is called as ``objective(model, batch, entropy_threshold, generator, device)`` and returns
``(loss, terms)``: the loss to minimise (including the model's weighted auxiliary losses) and scalar
terms to log. It declares the names of its terms (``terms``, the per-step metric columns besides
``loss``) and which of them validation reports (``val_terms``: validation column -> term).

HR bins that were not measured (``hr_mask`` False in the batch: spot-only slides prepared in the
self-supervised mode, where bins without a spot hold no ground truth) do not count in the regression
losses (``mse`` and ``spot_poisson``): the losses are means over measured bins only. In the diffusion loss
the unmeasured bins' target is the condition's own guess instead (x0 = 0 for residual targets: no residual
where nothing was measured). :meth:`~diffst.diffusion.process.GaussianDiffusion.training_losses` can leave
masked bins out (``mask=``), but then nothing ties the samples there: on HER2ST their spread off the tissue
came out larger than the counts on it, so the objective keeps them in with that target.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.config import RunConfig
from diffst.diffusion.process import GaussianDiffusion
from diffst.diffusion.target import TargetKind, encode_target, lr_on_hr_grid
from diffst.models.base import Conditions, regress
from diffst.runs import DatasetSpec, regression_output


class BaseAnswers(Protocol):
    """What a ``regression_residual`` objective asks of its frozen base: HR answers for a batch, in model space.

    A :class:`~diffst.training.frozen_base.FrozenBase`, or a loaded regression :class:`~diffst.runs.Run`.
    """

    def predict_hr(self, batch: Mapping[str, Tensor], device: torch.device) -> Tensor: ...

__all__ = ["Objective", "DiffusionObjective", "RegressionObjective", "SpotPoissonObjective", "make_objective",
           "hr_mask_of", "masked_mean"]
log = logging.getLogger("diffst.training")


class Objective(Protocol):
    """A training objective (see the module docstring)."""

    terms: tuple[str, ...]
    val_terms: Mapping[str, str]

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor], entropy_threshold: float | None,
                 generator: torch.Generator, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss of one batch and its terms (see the module docstring)."""
        ...


def hr_mask_of(batch: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Return the batch's HR mask as (B, 1, H, W) weights on ``device``, or None when every bin is measured.

    Parameters
    ----------
    batch
        A dataset batch; ``hr_mask`` (B, H, W) bool when the data have one.
    device, dtype
        Where and as what the weights are wanted.

    Returns
    -------
    Tensor or None
        1 for measured HR bins, 0 for the others; None when the batch has no mask or no bin is unmeasured
        (the losses then stay plain means).
    """
    mask = batch.get("hr_mask")
    if mask is None or bool(mask.all()):
        return None
    return mask.to(device)[:, None].to(dtype)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of (B, N, H, W) ``values`` over the bins where ``mask`` (B, 1, H, W) is 1 (all bins when None).

    Parameters
    ----------
    values
        Per-bin losses.
    mask
        Weights from :func:`hr_mask_of`, or None.

    Returns
    -------
    Tensor
        A scalar; 0 when no bin is measured.
    """
    if mask is None:
        return values.mean()
    return (values * mask).sum() / (mask.sum() * values.shape[1]).clamp_min(1.0)


def _inputs(batch: Mapping[str, Tensor], entropy_threshold: float | None, target: TargetKind,
            device: torch.device, base: BaseAnswers | None = None,
            fill_unmeasured: bool = False) -> tuple[Tensor, Conditions]:
    """Return the target x0 and the conditions of a batch, on ``device``.

    With a base run (``regression_residual``) its frozen prediction is computed from the same (augmented)
    batch, without gradients. ``fill_unmeasured``: unmeasured HR bins (``hr_mask`` False) take the
    condition's own guess (the base prediction, else the interpolated LR) before encoding.
    """
    cond = Conditions.from_batch(batch, entropy_threshold).to(device, non_blocking=True)
    prior = base.predict_hr(batch, device) if base is not None else None
    hr = batch["hr"].to(device, non_blocking=True)
    mask = hr_mask_of(batch, device, torch.bool) if fill_unmeasured else None
    if mask is not None:
        guess = prior.to(hr.dtype) if prior is not None else lr_on_hr_grid(cond.lr.to(hr.dtype), hr.shape[-2:])
        hr = torch.where(mask, hr, guess)
    return encode_target(hr, cond.lr, target, prior), cond


class DiffusionObjective:
    """The diffusion objective of :meth:`~diffst.diffusion.process.GaussianDiffusion.training_losses`.

    Timesteps and noise are drawn from the step's generator (on the CPU, so runs are reproducible on any
    device); the model's auxiliary losses are added with weight ``aux_weight``. Unmeasured HR bins
    (``hr_mask`` False) get the condition's own guess as their target (see the module docstring).

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

    def __init__(self, diffusion: GaussianDiffusion, aux_weight: float, base: BaseAnswers | None = None):
        self.diffusion = diffusion
        self.aux_weight = aux_weight
        self.base = base

    def __call__(self, model, batch, entropy_threshold, generator, device):
        """See :class:`Objective`."""
        hr = batch["hr"]
        t = self.diffusion.sample_timesteps(hr.shape[0], generator=generator)
        noise = torch.randn(hr.shape, generator=generator, dtype=hr.dtype)
        x0, cond = _inputs(batch, entropy_threshold, self.diffusion.cfg.target, device, self.base,
                           fill_unmeasured=True)
        # Unmeasured bins stay in the loss with a residual target of zero (training_losses could leave them
        # out, mask=...): left out, nothing ties the samples there and they come out wild off the tissue.
        terms = self.diffusion.training_losses(model, x0, t.to(device), noise=noise.to(device), model_kwargs=cond)
        terms["diffusion_loss"] = terms.pop("loss")
        return _with_aux(terms["diffusion_loss"], terms, self.aux_weight)


class RegressionObjective:
    """Plain regression: MSE in model space between the model's direct prediction and the target.

    The denoiser is called with x_t = 0 at t = 0 (:func:`~diffst.models.base.regress`) and predicts the
    target x0 (the HR maps, or their residual over interpolated LR) from the conditions alone. The mean
    runs over measured HR bins only (``hr_mask``).

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

    def __init__(self, target: TargetKind, aux_weight: float, base: BaseAnswers | None = None):
        self.target = target
        self.aux_weight = aux_weight
        self.base = base

    def __call__(self, model, batch, entropy_threshold, generator, device):
        """See :class:`Objective` (``generator`` is unused: the objective draws nothing)."""
        x0, cond = _inputs(batch, entropy_threshold, self.target, device, self.base)
        out = regress(model, cond, tuple(x0.shape))
        mask = hr_mask_of(batch, device, x0.dtype)
        mse = F.mse_loss(out.prediction, x0) if mask is None else masked_mean((out.prediction - x0) ** 2, mask)
        return _with_aux(mse, {"mse": mse, **out.aux_losses}, self.aux_weight)


class SpotPoissonObjective:
    """Spot-ratio regression (``train.regression: spot_poisson``): Poisson deviance of the HR counts.

    The model's output shares each LR spot's count out over its bins (:func:`~diffst.runs.regression_output`),
    so only where the counts go inside a spot is learned, never how many there are. The deviance of each
    gene is divided by the gene's mean HR count in the batch, so that every gene weighs alike whatever its
    expression level (as the per-gene correlation the benchmark reports does). Bins of unmeasured LR spots
    (``lr_mask`` False) and unmeasured HR bins (``hr_mask`` False) do not count.

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
        hr_mask = hr_mask_of(batch, device, hr.dtype)
        if hr_mask is not None:
            mask = mask * hr_mask
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


def make_objective(cfg: RunConfig, base: BaseAnswers | None = None,
                   dataset: DatasetSpec | None = None) -> DiffusionObjective | RegressionObjective | SpotPoissonObjective:
    """Make the objective ``cfg.train.objective`` names, set up from ``cfg``.

    Parameters
    ----------
    cfg
        The run configuration (``train.objective``, ``train.disentangle_weight``, ``diffusion``).
    base
        The frozen regression run's answers (:class:`~diffst.training.frozen_base.FrozenBase`) of a
        ``regression_residual`` target; None otherwise.
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
