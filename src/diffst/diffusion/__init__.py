"""Diffusion process, training objective and samplers."""

from diffst.diffusion.config import DiffusionConfig, SamplerConfig
from diffst.diffusion.process import GaussianDiffusion, MeanVariance, linear_betas, spaced_timesteps
from diffst.diffusion.samplers import (
    SAMPLERS,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp,
    sample_k,
    sample_with_config,
    x0_probe,
)

__all__ = [
    "SAMPLERS",
    "DiffusionConfig",
    "GaussianDiffusion",
    "MeanVariance",
    "SamplerConfig",
    "linear_betas",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp",
    "sample_k",
    "sample_with_config",
    "spaced_timesteps",
    "x0_probe",
]
