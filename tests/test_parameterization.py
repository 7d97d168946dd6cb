"""v-parameterisation: an exact velocity model makes every sampler return the data."""

import pytest
import torch

from diffst.diffusion.config import DiffusionConfig
from diffst.diffusion.process import GaussianDiffusion
from diffst.diffusion.samplers import sample
from diffst.models.base import DenoiserOutput

C = 0.3


def exact_velocity(diffusion: GaussianDiffusion):
    abar = diffusion.alphas_cumprod

    def model_fn(x, t):
        a = abar.to(x.dtype)[t.long()].reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * C) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * C

    return model_fn


@pytest.mark.parametrize("method,steps", [("ddpm", 50), ("ddim", 20), ("dpmpp", 10)])
def test_exact_velocity_model_recovers_constant_data(method, steps):
    diffusion = GaussianDiffusion(DiffusionConfig(parameterization="v", learn_sigma=False))
    x = sample(exact_velocity(diffusion), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
               diffusion, method, steps, generator=torch.Generator().manual_seed(1))
    assert float((x - C).abs().max()) < 1e-2


def test_velocity_loss_is_zero_for_the_exact_model():
    diffusion = GaussianDiffusion(DiffusionConfig(parameterization="v", learn_sigma=False, loss="mse"))
    fn = exact_velocity(diffusion)
    x0 = torch.full((2, 3, 8, 8), C)
    terms = diffusion.training_losses(lambda x, t: DenoiserOutput(fn(x, t)), x0, torch.tensor([10, 900]))
    assert float(terms["loss"]) < 1e-8 and float(terms["eps_mse"]) < 1e-6
    eps_model = GaussianDiffusion(DiffusionConfig(learn_sigma=False, loss="mse"))
    assert float(eps_model.training_losses(lambda x, t: DenoiserOutput(fn(x, t)), x0, torch.tensor([10, 900]))["loss"]) > 0.01


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_learned_variance_bound_sees_the_same_mean_as_sampling(parameterization):
    """The variance head is trained against the reverse step the samplers take: the bound inside
    training_losses equals vlb_terms of the same raw prediction (a v prediction converted once)."""
    diffusion = GaussianDiffusion(DiffusionConfig(parameterization=parameterization, learn_sigma=True))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    prediction = torch.randn(2, 6, 8, 8, generator=gen)
    t = torch.tensor([40, 700])
    terms = diffusion.training_losses(lambda x, tt: DenoiserOutput(prediction), x0, t, noise=noise)
    expected = diffusion.vlb_terms(prediction, x0, diffusion.q_sample(x0, t, noise), t).mean()
    torch.testing.assert_close(terms["vlb"], expected)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_x0_probe_of_an_exact_model_is_the_data(parameterization):
    from diffst.diffusion.samplers import x0_probe

    diffusion = GaussianDiffusion(DiffusionConfig(parameterization=parameterization, learn_sigma=False))
    abar = diffusion.alphas_cumprod

    def exact(x, t):
        a = abar.to(x.dtype)[t.long()].reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * C) / (1 - a).sqrt()
        return eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * C

    x0 = x0_probe(exact, (2, 3, 8, 8), diffusion, draws=3, generator=torch.Generator().manual_seed(0))
    assert float((x0 - C).abs().max()) < 1e-3
