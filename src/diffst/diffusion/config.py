"""Configuration of the diffusion process and of the samplers (pydantic v2, saved with every run)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DiffusionConfig(BaseModel):
    """The forward process and the training objective.

    Attributes
    ----------
    num_timesteps
        Number of diffusion steps T used in training (the paper: 1000).
    beta_schedule
        ``"linear"``: betas evenly spaced from ``1e-4 * 1000 / T`` to ``0.02 * 1000 / T`` (the DDPM schedule,
        rescaled so that any T gives the same overall amount of noise).
    learn_sigma
        The model predicts 2N channels: epsilon and the variance interpolation value v (Improved DDPM's
        "learned range" between log beta_t and log beta-tilde_t). Otherwise N channels of epsilon and the
        sampler uses the fixed posterior variance beta-tilde_t.
    loss
        Loss on epsilon: ``"hybrid"`` (MSE, plus the VLB term for the variance when ``learn_sigma``),
        ``"mse"`` (MSE only; with ``learn_sigma`` the variance half receives no gradient) or
        ``"charbonnier"`` (sqrt(e^2 + eps^2), as in the authors' code, plus the VLB term when ``learn_sigma``).
    lambda_vlb
        Weight of the variational bound. The term added to the loss is ``lambda_vlb * T * L_t``, the
        single-sample estimate of ``lambda_vlb * L_vlb`` under uniform t. With the defaults (0.001, T = 1000)
        this is ``1 * L_t``, as in Improved DDPM.
    eps_loss_reduction
        ``"mean"``: the epsilon loss is averaged over all elements; ``"sum"``: summed over channels and
        pixels, averaged over the batch.
    charbonnier_eps
        The eps of the Charbonnier loss.
    decoder_nll
        Term of the bound at t = 0: ``"discretized"`` (guided-diffusion's discretised Gaussian likelihood of
        data in [-1, 1] with 255 bins) or ``"gaussian"`` (continuous Gaussian NLL; gene expression is not
        8-bit data, but its value is a density, not a probability, so it can be negative).
    target
        What x0 is: ``"hr"`` (the HR maps, the paper's formulation) or ``"residual"`` (HR minus the LR
        interpolated onto the HR grid, halved; see :mod:`diffst.diffusion.target`) or
        ``"regression_residual"`` (HR minus the prediction of the regression run ``train.base_run``, halved:
        CorrDiff's two stages).
    parameterization
        What the first N output channels mean: ``"eps"`` (the noise, the paper's choice) or ``"v"`` (the
        velocity sqrt(abar) eps - sqrt(1 - abar) x0, trained with the same loss on v). v stays well
        conditioned at large t, where an epsilon model must be extremely precise for x0 to be right,
        so short (CPU) runs sample far better with it.
    """

    model_config = ConfigDict(extra="forbid")

    num_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear"] = "linear"
    learn_sigma: bool = True
    loss: Literal["hybrid", "mse", "charbonnier"] = "hybrid"
    lambda_vlb: float = Field(0.001, ge=0.0)
    eps_loss_reduction: Literal["mean", "sum"] = "mean"
    charbonnier_eps: float = Field(1e-3, gt=0.0)
    decoder_nll: Literal["discretized", "gaussian"] = "discretized"
    target: Literal["hr", "residual", "regression_residual"] = "residual"
    parameterization: Literal["eps", "v"] = "eps"


class SamplerConfig(BaseModel):
    """How to sample at inference time.

    Attributes
    ----------
    method
        ``"ddpm"`` (ancestral, learned variance), ``"ddim"`` or ``"dpmpp"`` (DPM-Solver++ 2M).
    steps
        Number of model evaluations; ``None`` means all T training steps (the paper's 1000-step DDPM).
    eta
        DDIM stochasticity (0 = deterministic); ignored by the other methods.
    num_samples
        K samples per input, summarised as mean and standard deviation maps.
    clip
        Clip the predicted x0 to [-1, 1] at every step.
    point_estimate
        What a prediction reports as its answer (``X``): ``"x0_probe"``, the model's x0-prediction at the
        last timestep averaged over ``probe_draws`` noise draws (an estimate of the posterior mean, one network
        call per draw), ``"sample_mean"``, the mean of the K samples, or ``"base"``, the prediction of a
        two-stage run's regression stage (one network call; the diffusion then only adds the spread, as in
        CorrDiff). ``"auto"``: ``"base"`` for two-stage runs, ``"x0_probe"`` otherwise. For PCC and RMSE
        against observed counts the posterior mean is the optimal answer; single samples carry Poisson-like
        texture.
    probe_draws
        Noise draws (network calls) of the x0 probe.
    point_views
        A regression's answer (a regression run's, and the ``base`` point estimate of a two-stage run) is
        the mean of its answers to the tile under this many of its 8 square symmetries (the quarter turns
        first, then their mirror images; the training augmentation; one network call each, per member of a
        seed ensemble): less variance than one answer. 1 asks once. Region cross-validation on the built-in
        crop: 4 views score as 8 do (4 seeds, PCC at 5x / 10x: 0.571 / 0.468 with 4 views, 0.570 / 0.468
        with 8, 0.570 / 0.463 with 1), at half the work. The samples of a two-stage run are drawn around it.
    spot_consistent
        Make every s x s block of the point estimate and of each sample add up to the LR count measured
        there (:func:`~diffst.core.spots.project_to_spots`; unmeasured spots are left as predicted): the
        spots say how much, the model says where.
    interval_spread
        Factor on the samples' deviations from the point estimate when the intervals of observed counts are
        computed (:mod:`diffst.inference.intervals`): 1 uses the samples as drawn; a factor fitted on held-out
        tiles (``diffst benchmark`` reports one per fold) calibrates them. Recorded with every prediction.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["ddpm", "ddim", "dpmpp"] = "ddpm"
    steps: int | None = Field(None, ge=1)
    eta: float = Field(0.0, ge=0.0)
    num_samples: int = Field(1, ge=1)
    clip: bool = True
    point_estimate: Literal["auto", "x0_probe", "sample_mean", "base"] = "auto"
    probe_draws: int = Field(8, ge=1)
    point_views: int = Field(4, ge=1, le=8)
    spot_consistent: bool = True
    interval_spread: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _eta_only_for_ddim(self) -> SamplerConfig:
        if self.eta != 0.0 and self.method != "ddim":
            raise ValueError(f"eta={self.eta} is only used by method='ddim', not {self.method!r}; set eta=0")
        return self
