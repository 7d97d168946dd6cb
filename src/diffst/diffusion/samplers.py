"""Samplers as small functions (k-diffusion style).

Every sampler takes ``model_fn(x, t) -> prediction``, where ``t`` is a (B,) long tensor of ORIGINAL
(training) timesteps and ``prediction`` the raw model output ((B, N, ...) epsilon or (B, 2N, ...) epsilon
and v); the caller binds the conditions, e.g. ``lambda x, t: model(x, t, **cond).prediction``.

- :func:`sample_ddpm`: ancestral sampling with the learned variance, over all T steps or a respaced
  subset (the variance then interpolates between the respaced beta and beta-tilde).
- :func:`sample_ddim`: DDIM (eta = 0: deterministic).
- :func:`sample_dpmpp`: DPM-Solver++ 2M (multistep, data prediction), through diffusers'
  ``DPMSolverMultistepScheduler`` configured with our betas.

Respaced DDPM and DDIM visit the same evenly spaced timesteps (from T-1 down to 0, see
:func:`~diffst.diffusion.process.spaced_timesteps`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffst.diffusion.config import SamplerConfig
from diffst.diffusion.process import GaussianDiffusion
from diffst.errors import InputError

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw standard normal noise shaped like x, drawn on the generator's device (reproducible), moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _progress(it: Iterable[int], progress: bool, desc: str, total: int) -> Iterable[int]:
    return tqdm(it, desc=desc, total=total, leave=False) if progress else it


def _step_t(i: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)


def sample_ddpm(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip: bool = True,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral DDPM sampling with the learned (or fixed beta-tilde) variance.

    Parameters
    ----------
    model_fn
        ``model_fn(x, t_original) -> prediction``.
    noise
        (B, N, H, W) initial x_T.
    diffusion
        The training process; respaced here when ``steps`` < its number of steps.
    steps
        ``None``: all T steps (the paper). Fewer: evenly spaced timesteps, with the respaced betas.
    generator
        Source of the per-step noise.
    progress
        Show a tqdm bar.
    clip
        Clip the predicted x0 to [-1, 1].
    callback
        Called after each step with ``{"i", "t", "x", "pred_x0"}``.

    Returns
    -------
    Tensor
        The sample x_0, shaped like ``noise``.
    """
    proc = diffusion.respaced(steps)
    x = noise
    n = proc.num_timesteps
    for i in _progress(range(n - 1, -1, -1), progress, "ddpm", n):
        t = _step_t(i, x)
        t_orig = proc.original_timesteps(t)
        out = proc.p_mean_variance(model_fn(x, t_orig), x, t, clip=clip)
        x = out.mean + torch.exp(0.5 * out.log_variance) * _randn_like(x, generator) if i > 0 else out.mean
        if callback is not None:
            callback({"i": i, "t": t_orig, "x": x, "pred_x0": out.pred_x0})
    return x


def _eps_and_x0(proc: GaussianDiffusion, prediction: Tensor, x: Tensor, t: Tensor, clip: bool) -> tuple[Tensor, Tensor]:
    """Return epsilon and x0 from a prediction.

    With ``clip``, x0 is clipped to [-1, 1] and epsilon recomputed from it, so deterministic updates stay
    consistent with the clipped x0.
    """
    eps, _ = proc.split_prediction(prediction, x, t)
    x0 = proc.predict_x0(x, t, eps)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = proc.predict_eps(x, t, x0)
    return eps, x0


def sample_ddim(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip: bool = True,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021); ``eta = 0`` is deterministic given ``noise``.

    The variance half of a learned-sigma prediction is ignored. With ``clip``, epsilon is recomputed
    from the clipped x0 so the update stays consistent. Parameters as in :func:`sample_ddpm`.
    """
    proc = diffusion.respaced(steps)
    x = noise
    n = proc.num_timesteps
    for i in _progress(range(n - 1, -1, -1), progress, "ddim", n):
        t = _step_t(i, x)
        t_orig = proc.original_timesteps(t)
        eps, x0 = _eps_and_x0(proc, model_fn(x, t_orig), x, t, clip)
        abar = proc._gather(proc.alphas_cumprod, t, x)
        abar_prev = proc._gather(proc.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        x = abar_prev.sqrt() * x0 + torch.sqrt((1.0 - abar_prev - sigma**2).clamp(min=0.0)) * eps
        if eta > 0 and i > 0:
            x = x + sigma * _randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t_orig, "x": x, "pred_x0": x0})
    return x


def sample_dpmpp(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip: bool = True,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++ 2M (Lu et al. 2022), multistep, data prediction, via diffusers.

    Timesteps: ``steps`` + 1 evenly spaced points from T-1 to 0, the model evaluated at all but the last,
    the final update going to noise level zero (diffusers' ``"linspace"`` spacing); first-order final
    step. ``steps=None`` means T - 1 steps (the most that avoids duplicate timesteps). ``generator`` is
    unused (the solver is deterministic); parameters otherwise as in :func:`sample_ddpm`.
    """
    from diffusers import DPMSolverMultistepScheduler

    T = diffusion.num_timesteps
    n = min(steps if steps is not None else T - 1, T - 1)
    if n < 1:
        raise InputError(f"steps={steps}: DPM-Solver++ needs at least one step")
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=diffusion.betas.numpy(),
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    with warnings.catch_warnings():  # diffusers converts a torch tensor with np.array (numpy 2 deprecation)
        warnings.simplefilter("ignore", DeprecationWarning)
        sched.set_timesteps(timesteps=timesteps.tolist(), device=noise.device)
    x = noise
    for t_int in _progress(sched.timesteps.tolist(), progress, "dpm++", n):
        t = _step_t(int(t_int), x)
        t_orig = diffusion.original_timesteps(t)
        eps, _ = _eps_and_x0(diffusion, model_fn(x, t_orig), x, t, clip)  # the solver gets the clipped epsilon
        x = sched.step(eps, int(t_int), x).prev_sample
        if callback is not None:
            callback({"i": int(t_int), "t": t_orig, "x": x})
    return x


def sampling_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Mixed precision for a sampler's network calls, where it pays: a context manager.

    CUDA: autocast to bf16 (fp16 on GPUs without bf16). CPU: bf16 autocast on processors with native bf16
    instructions (AVX512-BF16 or AMX), where a step of K = 4 samples at the paper geometry takes 0.72x the
    float32 time (paired, benchmarks/bench_speed.py); elsewhere float32 (emulated bf16 is slower). The
    sampler's own arithmetic stays in float32; the network's output moves by about 2 % (relative RMS), far
    less than the spread of the samples it shapes.

    Parameters
    ----------
    device
        Where the network runs.

    Returns
    -------
    contextlib.AbstractContextManager
        ``torch.autocast`` or a no-op context.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if device.type == "cpu" and native_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp": sample_dpmpp}


def sample(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    method: str = "ddpm",
    steps: int | None = None,
    **kw: Any,
) -> Tensor:
    """Run the sampler named ``method`` (``"ddpm"``, ``"ddim"`` or ``"dpmpp"``); ``kw`` go to it.

    Only :func:`sample_ddim` takes ``eta``; :class:`~diffst.diffusion.config.SamplerConfig` is where a
    setting of eta for another method is refused (see :func:`sample_with_config`).
    """
    try:
        fn = SAMPLERS[method]
    except KeyError:
        raise InputError(f"unknown sampler {method!r}; choose one of {sorted(SAMPLERS)}") from None
    if steps is not None and not 1 <= steps <= diffusion.num_timesteps:
        raise InputError(f"steps={steps}: the sampler takes between 1 and the process's {diffusion.num_timesteps} "
                         "steps (None or 0 on the command line = all of them)")
    return fn(model_fn, noise, diffusion, steps, **kw)


def sample_k(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    diffusion: GaussianDiffusion,
    method: str = "ddpm",
    steps: int | None = None,
    k: int = 1,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_samples: bool = False,
    **kw: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """K independent samples per input, summarised as per-pixel mean and standard deviation.

    Each sample starts from its own x_T drawn from ``generator`` (so even deterministic samplers give
    K different samples). By default the samples run one after another, so memory stays that of one
    sample; with ``batch_samples`` they run as one batch of K * B maps (one network call per step for
    all K), which needs a ``model_fn`` that takes K copies of the batch (e.g. one made with
    :func:`~diffst.models.base.bind_conditions`). Batched, the noise is drawn in another order (all
    x_T first, then each step's noise for the whole batch), so for one seed the samples differ from the
    one-after-another ones while following the same distribution.

    Parameters
    ----------
    shape
        (B, N, H, W) of one sample batch (B must match the conditions bound in ``model_fn``).
    k
        Number of samples.
    generator
        Source of all randomness (initial noise and sampler noise).
    device, dtype
        Where the samples live (default: the generator's device, else CPU).
    batch_samples
        Run the K samples as one batch (see above).
    kw
        Passed to :func:`sample` (``clip``, ``eta``, ``progress``, ...).

    Returns
    -------
    mean, std, samples
        (B, N, H, W) mean, (B, N, H, W) standard deviation across samples (unbiased, zeros when K = 1)
        and (K, B, N, H, W) samples.
    """
    if k < 1:
        raise InputError(f"k={k}: need at least one sample")
    gen_device = generator.device if generator is not None else (device or "cpu")
    device = device if device is not None else gen_device

    def initial_noise() -> Tensor:
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)

    if batch_samples:
        noise = torch.cat([initial_noise() for _ in range(k)])
        samples = sample(model_fn, noise, diffusion, method, steps, generator=generator, **kw).reshape(k, *shape)
    else:
        # Each x_T is drawn right before its sample runs, as before batching existed (same draws for a seed).
        samples = torch.stack([sample(model_fn, initial_noise(), diffusion, method, steps, generator=generator, **kw)
                               for _ in range(k)])
    std = samples.std(dim=0, correction=1) if k > 1 else torch.zeros_like(samples[0])
    return samples.mean(dim=0), std, samples


def sample_with_config(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    diffusion: GaussianDiffusion,
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
    **kw: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sample_k` with method, steps, K, eta and clip taken from a :class:`SamplerConfig`."""
    if cfg.method == "ddim":
        kw.setdefault("eta", cfg.eta)
    return sample_k(
        model_fn, shape, diffusion, cfg.method, cfg.steps, cfg.num_samples, generator, clip=cfg.clip, **kw
    )


@torch.no_grad()
def x0_probe(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    diffusion: GaussianDiffusion,
    draws: int = 8,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    clip: bool = True,
) -> Tensor:
    """Estimate the posterior mean E[x0 | conditions] from x0-predictions at the last timestep.

    At t = T-1 the noisy input carries almost nothing of x0, so the model's x0-prediction there is its
    estimate of the conditional mean; averaging over ``draws`` noise inputs removes what remains of
    the noise. Costs one network call per draw (a sampler costs steps x K).

    Parameters
    ----------
    model_fn
        ``model_fn(x_t, original_t) -> prediction`` with the conditions bound.
    shape
        (B, N, H, W) of the batch.
    diffusion
        The training process.
    draws
        Number of noise draws averaged.
    generator, device
        Source of the noise, and where it lives (default: the generator's device, else CPU).
    clip
        Clip each x0-prediction to [-1, 1].

    Returns
    -------
    Tensor
        (B, N, H, W) mean x0-prediction.
    """
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    t = torch.full((shape[0],), diffusion.num_timesteps - 1, dtype=torch.long, device=device)
    total = torch.zeros(shape, device=device)
    for _ in range(draws):
        x = torch.randn(shape, generator=generator, device=device)
        eps, _ = diffusion.split_prediction(model_fn(x, diffusion.original_timesteps(t)), x, t)
        x0 = diffusion.predict_x0(x, t, eps)
        total += x0.clamp(-1.0, 1.0) if clip else x0
    return total / draws

