"""The Gaussian diffusion process: schedule, forward noising, reverse step and training objective.

It holds the noise schedule, the learned-variance reverse step and the training objective (epsilon loss +
variational bound for the variance, Improved DDPM).

The model knows nothing about diffusion: :meth:`GaussianDiffusion.training_losses` calls
``model(x_t, t, **model_kwargs)`` and reads its :class:`~diffst.models.base.DenoiserOutput`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from diffst.diffusion.config import DiffusionConfig
from diffst.errors import InputError

_LOG2 = math.log(2.0)


def linear_betas(num_timesteps: int) -> Tensor:
    """DDPM's linear beta schedule, rescaled for ``num_timesteps`` (float64)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def spaced_timesteps(num_timesteps: int, steps: int | None) -> list[int]:
    """Evenly spaced original timesteps for a respaced process, ascending.

    ``steps`` timesteps from 0 to ``num_timesteps - 1`` inclusive (rounded); ``None`` or ``steps >=
    num_timesteps`` gives all of them, ``steps == 1`` gives only the last.
    """
    if steps is None or steps >= num_timesteps:
        return list(range(num_timesteps))
    if steps < 1:
        raise InputError(f"steps={steps}: need at least one sampling step")
    if steps == 1:
        return [num_timesteps - 1]
    return sorted({int(v) for v in np.linspace(0, num_timesteps - 1, steps).round()})


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) element-wise, in nats."""
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability (nats) of data in [-1, 1] under a Gaussian discretised into 255 bins of width 2/255.

    The outermost bins extend to -inf and +inf, so values at or beyond the edges are finite too.
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Continuous Gaussian log-density (nats) element-wise."""
    return -0.5 * (math.log(2.0 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def _mean_flat(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over all but the first axis; with ``mask`` (broadcastable 0/1 weights), over its bins only."""
    dims = tuple(range(1, x.ndim))
    if mask is None:
        return x.mean(dim=dims)
    w = torch.broadcast_to(mask.to(x.dtype), x.shape)
    return (x * w).sum(dim=dims) / w.sum(dim=dims).clamp_min(1.0)


def _sum_flat(x: Tensor, mask: Tensor | None = None) -> Tensor:
    if mask is not None:
        x = x * torch.broadcast_to(mask.to(x.dtype), x.shape)
    return x.sum(dim=tuple(range(1, x.ndim)))


class MeanVariance(NamedTuple):
    """Reverse-step Gaussian p(x_{t-1} | x_t) and the x0 it implies (all shaped like x_t)."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor


class GaussianDiffusion:
    """Schedule tensors and the maths of a (possibly respaced) Gaussian diffusion process.

    Parameters
    ----------
    cfg
        The process configuration.
    betas, timestep_map
        Internal, used by :meth:`respace`: the betas of a respaced process and, for each of its steps,
        the original timestep the model must be called with.

    Notes
    -----
    Timestep arguments of :meth:`q_sample`, :meth:`q_posterior`, :meth:`p_mean_variance` and the like
    index THIS process's schedule. For the process built from a config they are the original timesteps;
    for a respaced process they are indices 0..steps-1, and ``timestep_map[t]`` is the original timestep
    the model sees. Schedules are stored in float64 on the CPU and gathered to the device and dtype of
    the input on use.
    """

    def __init__(
        self,
        cfg: DiffusionConfig | None = None,
        *,
        betas: Tensor | None = None,
        timestep_map: Sequence[int] | None = None,
    ) -> None:
        self.cfg = cfg if cfg is not None else DiffusionConfig()
        if betas is None:
            betas = linear_betas(self.cfg.num_timesteps)
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise InputError("betas must be a 1-D tensor with values in (0, 1]")
        n = betas.shape[0]
        self.timestep_map = torch.as_tensor(
            list(range(n)) if timestep_map is None else list(timestep_map), dtype=torch.long
        )
        if self.timestep_map.shape[0] != n:
            raise InputError(f"timestep_map has {self.timestep_map.shape[0]} entries, betas {n}")

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # posterior q(x_{t-1} | x_t, x0): variance beta-tilde_t and the two mean coefficients
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_0 = 0: its log is replaced by that of beta-tilde_1 (only used at t = 0)
        first = self.posterior_variance[1:2] if n > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    # ------------------------------------------------------------------ helpers
    @property
    def num_timesteps(self) -> int:
        """Number of steps of this (possibly respaced) process."""
        return int(self.betas.shape[0])

    @property
    def is_respaced(self) -> bool:
        """Whether the process skips original timesteps."""
        return self.num_timesteps != self.cfg.num_timesteps

    @staticmethod
    def _gather(arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """``arr[t]`` on x's device and dtype, shaped (B, 1, 1, ...) to broadcast against x."""
        out = arr.to(x.device)[t.to(x.device).long()].to(x.dtype)
        return out.reshape(out.shape + (1,) * (x.ndim - out.ndim))

    def original_timesteps(self, t: Tensor) -> Tensor:
        """Map this process's steps ``t`` to the original (training) timesteps."""
        return self.timestep_map.to(t.device)[t.long()]

    def respace(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """Build a process that visits only the given original timesteps.

        Its betas are ``1 - abar[s_i] / abar[s_{i-1}]`` (with ``abar[s_{-1}] = 1``), so its cumulative
        alphas equal the original ones at the kept timesteps, and beta-tilde follows from these betas.

        Parameters
        ----------
        timesteps
            Original timesteps to keep (any order, duplicates ignored), within ``[0, T)``.
        """
        keep = sorted({int(s) for s in timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise InputError(f"respaced timesteps must lie in [0, {self.num_timesteps}), got {keep[:3]}...")
        abar = self.alphas_cumprod[keep]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(
            self.cfg, betas=1.0 - abar / abar_prev, timestep_map=self.timestep_map[keep].tolist()
        )

    def respaced(self, steps: int | None) -> GaussianDiffusion:
        """Respace the process to ``steps`` evenly spaced timesteps (``self`` when ``steps`` is None or >= T)."""
        if steps is None or steps >= self.num_timesteps:
            return self
        return self.respace(spaced_timesteps(self.num_timesteps, steps))

    def split_prediction(self, prediction: Tensor, x: Tensor, t: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Split a model prediction into epsilon and (when ``learn_sigma``) the variance value v.

        With ``parameterization="v"`` the first half is the velocity sqrt(abar) eps - sqrt(1 - abar) x0
        and is turned into epsilon = sqrt(abar) v + sqrt(1 - abar) x_t, which needs x_t (``x``) and the
        step indices ``t`` of this process.
        """
        n = x.shape[1]
        expected = 2 * n if self.cfg.learn_sigma else n
        if (
            prediction.shape[0] != x.shape[0]
            or prediction.shape[1] != expected
            or prediction.shape[2:] != x.shape[2:]
        ):
            raise InputError(
                f"model prediction has shape {tuple(prediction.shape)}, expected {(x.shape[0], expected, *x.shape[2:])} "
                f"(learn_sigma={self.cfg.learn_sigma}); check the model's out_channels"
            )
        first, var_v = (prediction[:, :n], prediction[:, n:]) if self.cfg.learn_sigma else (prediction, None)
        if self.cfg.parameterization == "v":
            if t is None:
                raise InputError("a v-parameterised prediction needs the timesteps t to give epsilon")
            first = self._gather(self.sqrt_alphas_cumprod, t, x) * first + self._gather(
                self.sqrt_one_minus_alphas_cumprod, t, x
            ) * x
        return first, var_v

    # ------------------------------------------------------------------ forward process
    def q_sample(
        self, x0: Tensor, t: Tensor, noise: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Sample x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = (
            self._gather(self.posterior_mean_coef1, t, x_t) * x0
            + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        var = self._gather(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 implied by x_t and epsilon."""
        return (
            self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Epsilon implied by x_t and x0."""
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self, prediction: Tensor, x_t: Tensor, t: Tensor, *, clip: bool = False
    ) -> MeanVariance:
        """Compute the reverse step p(x_{t-1} | x_t) from a model prediction.

        With ``learn_sigma`` the log-variance is ``frac * log(beta_t) + (1 - frac) * log(beta-tilde_t)``
        with ``frac = (v + 1) / 2`` (Improved DDPM's learned range), using this process's betas: for a
        respaced process, the respaced beta and beta-tilde. Otherwise the variance is beta-tilde_t.

        Parameters
        ----------
        prediction
            (B, N, H, W) epsilon or (B, 2N, H, W) epsilon and v.
        x_t
            (B, N, H, W) current sample.
        t
            (B,) step indices of this process (see the class notes).
        clip
            Clip the predicted x0 to [-1, 1] before forming the mean.
        """
        eps, v = self.split_prediction(prediction, x_t, t)
        if v is None:
            log_var = self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        else:
            min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._gather(torch.log(self.betas), t, x_t)
            frac = (v + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self.predict_x0(x_t, t, eps)
        if clip:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return MeanVariance(mean, torch.exp(log_var), log_var, pred_x0)

    def vlb_terms(self, prediction: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-sample term L_t of the variational bound, in bits per dimension, shape (B,).

        KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL -log p(x0 | x_1) at
        t = 0 (see :attr:`DiffusionConfig.decoder_nll`); averaged over the bins of ``mask`` when given.
        """
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(prediction, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance), mask) / _LOG2
        if self.cfg.decoder_nll == "discretized":
            ll = discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)
        else:
            ll = gaussian_log_likelihood(x0, out.mean, out.log_variance)
        nll = -_mean_flat(ll, mask) / _LOG2
        return torch.where(t.to(x0.device) == 0, nll, kl)

    # ------------------------------------------------------------------ training
    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Uniform timesteps in ``[0, num_timesteps)``, shape (batch,), drawn on the generator's device."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def _eps_loss(self, eps_pred: Tensor, noise: Tensor, mask: Tensor | None = None) -> Tensor:
        diff = eps_pred - noise
        if self.cfg.loss == "charbonnier":
            per_elem = torch.sqrt(diff * diff + self.cfg.charbonnier_eps**2)
        else:
            per_elem = diff * diff
        if self.cfg.eps_loss_reduction == "mean":
            return _mean_flat(per_elem, mask)
        return _sum_flat(per_elem, mask)

    def training_losses(
        self,
        model: Callable[..., Any],
        x0: Tensor,
        t: Tensor,
        *,
        noise: Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Diffusion training objective for one batch.

        Parameters
        ----------
        model
            Called as ``model(x_t, original_t, **model_kwargs)``; returns a ``DenoiserOutput``.
        x0
            (B, N, H, W) clean HR maps, normalised to about [-1, 1].
        t
            (B,) timesteps of this process (see :meth:`sample_timesteps`).
        noise
            Optional fixed noise (default: standard normal, from ``generator``).
        model_kwargs
            Conditions passed to the model (e.g. LR maps, histology).
        mask
            Optional (B, 1, H, W) (or broadcastable) 0/1 weights of the bins that were measured: every loss
            is averaged over them only, so unmeasured bins (spot-only slides) teach nothing.

        Returns
        -------
        dict
            Scalars (batch means): ``"loss"`` (the diffusion objective: epsilon loss + ``lambda_vlb * T *
            vlb`` for the ``"hybrid"`` and ``"charbonnier"`` losses with ``learn_sigma``), ``"eps_mse"`` (MSE
            of epsilon, mean over elements, for monitoring), ``"eps_loss"`` (the epsilon loss used),
            ``"vlb"`` (only with ``learn_sigma``: the term L_t in bits/dim, computed with the epsilon half
            detached, so it trains only the variance), and every entry of the model's ``aux_losses``
            under its own name, unweighted.
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, self.original_timesteps(t.to(x0.device)), **model_kwargs)
        eps_pred, v = self.split_prediction(output.prediction, x_t, t)

        if self.cfg.parameterization == "v":
            n = x0.shape[1]
            velocity = (
                self._gather(self.sqrt_alphas_cumprod, t, x0) * noise
                - self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
            )
            eps_loss = self._eps_loss(output.prediction[:, :n], velocity, mask)
        else:
            eps_loss = self._eps_loss(eps_pred, noise, mask)
        terms: dict[str, Tensor] = {
            "eps_mse": _mean_flat((eps_pred.detach() - noise) ** 2, mask).mean(),
            "eps_loss": eps_loss.mean(),
        }
        loss = eps_loss
        if v is not None:
            # Stop-gradient on the mean: the bound trains only the variance. The raw first half is frozen,
            # not eps_pred, because vlb_terms converts it again (a v prediction into epsilon).
            frozen = torch.cat([output.prediction[:, : x0.shape[1]].detach(), v], dim=1)
            vlb = self.vlb_terms(frozen, x0, x_t, t, mask)
            terms["vlb"] = vlb.mean()
            if self.cfg.loss != "mse":
                loss = loss + self.cfg.lambda_vlb * self.num_timesteps * vlb
        terms["loss"] = loss.mean()
        for name, value in output.aux_losses.items():
            if name in terms:
                raise InputError(
                    f"the model's aux loss {name!r} clashes with a diffusion loss name; rename it"
                )
            terms[name] = value
        return terms
