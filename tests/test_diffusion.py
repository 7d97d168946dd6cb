"""The Gaussian diffusion process: schedule, forward noising, reverse-step formulas, training objective."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffst.diffusion import DiffusionConfig, GaussianDiffusion, SamplerConfig, linear_betas, spaced_timesteps
from diffst.diffusion.process import normal_kl
from diffst.errors import InputError
from diffst.models.base import DenoiserOutput


@pytest.fixture(scope="module")
def diff() -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig())


class FixedPrediction:
    """A "model" returning a given tensor (to inspect gradients) and given aux losses."""

    def __init__(self, prediction: torch.Tensor, aux: dict[str, torch.Tensor] | None = None):
        self.prediction = prediction
        self.aux = aux or {}
        self.seen_t: torch.Tensor | None = None

    def __call__(self, x_t, t, **kwargs):
        self.seen_t = t
        self.kwargs = kwargs
        return DenoiserOutput(self.prediction, dict(self.aux))


def test_linear_schedule_endpoints_and_scaling():
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b = linear_betas(250)
    assert b[0].item() == pytest.approx(4e-4) and b[-1].item() == pytest.approx(0.08)
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=250))
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - b, 0))
    assert d.alphas_cumprod[-1].item() < 1e-3  # x_T is (almost) pure noise


def test_q_sample_statistics(diff):
    torch.manual_seed(0)
    x0 = torch.full((3, 1, 200, 200), 0.7)
    t = torch.tensor([0, 250, 999])
    xt = diff.q_sample(x0, t)
    abar = diff.alphas_cumprod[t]
    for i in range(3):
        m, v = xt[i].mean().item(), xt[i].var().item()
        assert m == pytest.approx(math.sqrt(abar[i]) * 0.7, abs=0.01)
        assert v == pytest.approx(1 - abar[i].item(), abs=0.01, rel=0.02)


def test_posterior_matches_gaussian_conditioning(diff):
    """q(x_{t-1} | x_t, x0) derived independently by conditioning the joint Gaussian of (x_{t-1}, x_t)."""
    t = torch.tensor([1, 10, 500, 999])
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    xt = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    mean, var, log_var = diff.q_posterior(x0, xt, t)
    abar, abar_prev = diff.alphas_cumprod[t], diff.alphas_cumprod[t - 1]
    alpha = 1 - diff.betas[t]
    cov = alpha.sqrt() * (1 - abar_prev)  # Cov(x_{t-1}, x_t | x0)
    var_t = 1 - abar
    r = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    exp_mean = r(abar_prev.sqrt()) * x0 + r(cov / var_t) * (xt - r(abar.sqrt()) * x0)
    exp_var = (1 - abar_prev) - cov**2 / var_t
    torch.testing.assert_close(mean, exp_mean)
    torch.testing.assert_close(var[:, 0, 0, 0], exp_var)
    torch.testing.assert_close(log_var[:, 0, 0, 0], exp_var.log())
    # t = 0: variance 0, its log clipped to that of t = 1
    _, var0, log_var0 = diff.q_posterior(x0[:1], xt[:1], torch.tensor([0]))
    assert var0.abs().max().item() == 0.0
    assert log_var0[0, 0, 0, 0].item() == pytest.approx(diff.posterior_variance[1].log().item())


def test_p_mean_variance_learned_range(diff):
    t = torch.tensor([0, 5, 700])
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    xt = diff.q_sample(x0, t, noise)
    beta, beta_tilde = diff.betas[t], diff.posterior_variance[t].clone()
    beta_tilde[0] = diff.posterior_variance[1]
    for v, expected in [(-1.0, beta_tilde), (1.0, beta), (0.0, (beta * beta_tilde).sqrt())]:
        out = diff.p_mean_variance(torch.cat([noise, torch.full_like(noise, v)], 1), xt, t)
        torch.testing.assert_close(out.variance[:, 0, 0, 0], expected)
        torch.testing.assert_close(out.log_variance.exp(), out.variance)
        torch.testing.assert_close(out.pred_x0, x0)  # the true epsilon recovers x0
        torch.testing.assert_close(out.mean, diff.q_posterior(x0, xt, t)[0])
    # clipping acts on the predicted x0
    out = diff.p_mean_variance(torch.cat([noise + 3, torch.zeros_like(noise)], 1), xt, t, clip=True)
    assert out.pred_x0.abs().max().item() <= 1.0


def test_respaced_process(diff):
    ts = spaced_timesteps(1000, 20)
    assert len(ts) == 20 and ts[0] == 0 and ts[-1] == 999
    assert spaced_timesteps(1000, None) == list(range(1000)) and spaced_timesteps(1000, 1) == [999]
    r = diff.respaced(20)
    assert r.num_timesteps == 20 and r.is_respaced and r.timestep_map.tolist() == ts
    assert diff.respaced(None) is diff
    abar = diff.alphas_cumprod[ts]
    torch.testing.assert_close(r.alphas_cumprod, abar)
    # learned range interpolates between the RESPACED beta and beta-tilde
    i = torch.tensor([7])
    beta_r = 1 - abar[7] / abar[6]
    beta_tilde_r = (1 - abar[6]) / (1 - abar[7]) * beta_r
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    hi = r.p_mean_variance(torch.cat([x, x + 1], 1), x, i).variance.flatten()[0]
    lo = r.p_mean_variance(torch.cat([x, x - 1], 1), x, i).variance.flatten()[0]
    assert hi.item() == pytest.approx(beta_r.item(), rel=1e-9)
    assert lo.item() == pytest.approx(beta_tilde_r.item(), rel=1e-9)
    # the model is called with original timesteps
    m = FixedPrediction(torch.zeros(2, 2, 2, 2))
    r.training_losses(m, torch.zeros(2, 1, 2, 2), torch.tensor([0, 19]))
    assert m.seen_t.tolist() == [0, 999]


def test_training_losses_keys_finite_and_aux(diff):
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    pred = torch.randn(4, 6, 8, 8)
    aux = {"disentangle": torch.tensor(0.25)}
    m = FixedPrediction(pred, aux)
    t = torch.tensor([0, 1, 500, 999])
    out = diff.training_losses(m, x0, t, model_kwargs={"lr": "cond"})
    assert set(out) == {"loss", "eps_mse", "eps_loss", "vlb", "disentangle"}
    assert m.kwargs == {"lr": "cond"}
    for k, v in out.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    assert out["disentangle"].item() == 0.25  # unweighted pass-through
    # hybrid: eps MSE + lambda * T * L_t
    assert out["loss"].item() == pytest.approx(out["eps_mse"].item() + out["vlb"].item(), rel=1e-5)
    with pytest.raises(InputError, match="clashes"):
        diff.training_losses(FixedPrediction(pred, {"loss": torch.tensor(1.0)}), x0, t)
    with pytest.raises(InputError, match="out_channels"):
        diff.training_losses(FixedPrediction(pred[:, :3]), x0, t)


def test_vlb_zero_for_true_posterior(diff):
    """True epsilon and the beta-tilde variance (v = -1) make the KL terms vanish for t > 0."""
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 300, 999])
    xt = diff.q_sample(x0, t, noise)
    vlb = diff.vlb_terms(torch.cat([noise, -torch.ones_like(noise)], 1), x0, xt, t)
    assert vlb.abs().max().item() < 1e-8
    kl = normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1))
    assert kl.item() == pytest.approx(0.5)
    # t = 0: decoder NLL, positive and finite for both decoders
    t0 = torch.zeros(3, dtype=torch.long)
    for dec in ("discretized", "gaussian"):
        d = GaussianDiffusion(DiffusionConfig(decoder_nll=dec))
        nll = d.vlb_terms(torch.cat([noise, torch.zeros_like(noise)], 1), x0, d.q_sample(x0, t0, noise), t0)
        assert torch.isfinite(nll).all()
    assert (nll != 0).all()


def test_vlb_stop_gradient_on_epsilon(diff):
    x0 = torch.rand(2, 2, 4, 4) * 2 - 1
    pred = torch.randn(2, 4, 4, 4, requires_grad=True)
    t = torch.tensor([3, 600])
    out = diff.training_losses(FixedPrediction(pred), x0, t)
    (g_vlb,) = torch.autograd.grad(out["vlb"], pred, retain_graph=True)
    assert g_vlb[:, :2].abs().max().item() == 0.0
    assert g_vlb[:, 2:].abs().max().item() > 0.0
    # the epsilon half of the total loss gets exactly the epsilon-loss gradient
    (g_loss,) = torch.autograd.grad(out["loss"], pred, retain_graph=True)
    (g_eps,) = torch.autograd.grad(out["eps_loss"], pred)
    torch.testing.assert_close(g_loss[:, :2], g_eps[:, :2])


def test_loss_variants():
    x0 = torch.rand(2, 2, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 20])
    d = GaussianDiffusion(DiffusionConfig(learn_sigma=False))
    out = d.training_losses(FixedPrediction(noise), x0, t, noise=noise)
    assert "vlb" not in out and out["loss"].item() == 0.0
    with pytest.raises(InputError):
        d.training_losses(FixedPrediction(torch.cat([noise, noise], 1)), x0, t)
    pred = torch.cat([noise + 0.1, torch.zeros_like(noise)], 1)
    d = GaussianDiffusion(DiffusionConfig(loss="charbonnier", eps_loss_reduction="sum"))
    out = d.training_losses(FixedPrediction(pred), x0, t, noise=noise)
    assert out["eps_loss"].item() == pytest.approx(32 * math.sqrt(0.01 + 1e-6), rel=1e-4)
    d = GaussianDiffusion(DiffusionConfig(loss="mse"))
    out = d.training_losses(FixedPrediction(pred), x0, t, noise=noise)
    assert out["loss"].item() == pytest.approx(0.01, rel=1e-4) and "vlb" in out


def test_sample_timesteps(diff):
    t1 = diff.sample_timesteps(1000, torch.Generator().manual_seed(3))
    t2 = diff.sample_timesteps(1000, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.dtype == torch.long
    assert t1.min() >= 0 and t1.max() < 1000 and t1.float().std() > 200


def test_configs_validate():
    with pytest.raises(ValueError):
        DiffusionConfig(loss="l1")
    with pytest.raises(ValueError):
        SamplerConfig(method="ddpm", eta=0.5)
    assert SamplerConfig().steps is None
    assert DiffusionConfig.model_validate(DiffusionConfig().model_dump()) == DiffusionConfig()


class TinyDenoiser(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(n + 1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 2 * n, 3, padding=1)
        )

    def forward(self, x, t):
        tt = (t.float() / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return DenoiserOutput(self.net(torch.cat([x, tt], 1)))


def test_tiny_net_training_reduces_loss(diff):
    torch.manual_seed(0)
    n = 2
    x0 = torch.tanh(torch.randn(8, n, 8, 8))
    t = torch.linspace(0, 999, 8).long()
    noise = torch.randn_like(x0)
    model = TinyDenoiser(n)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(100):
        out = diff.training_losses(model, x0, t, noise=noise)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append((out["loss"].item(), out["eps_mse"].item(), out["vlb"].item()))
    final = diff.training_losses(model, x0, t, noise=noise)
    assert final["loss"].item() < 0.5 * history[0][0]
    assert final["eps_mse"].item() < 0.5 * history[0][1]
    assert final["vlb"].item() < history[0][2]


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_training_losses_leave_masked_bins_out(parameterization):
    """With a mask, what the unmeasured bins hold changes no loss term; the terms are means over measured bins."""
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=50, parameterization=parameterization))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 6, 6, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    pred = torch.randn(3, 4, 6, 6, generator=gen)
    t = torch.tensor([0, 7, 40])
    mask = torch.ones(3, 1, 6, 6)
    mask[:, :, :, :3] = 0.0
    garbage = x0.clone()
    garbage[:, :, :, :3] = 5.0
    a = d.training_losses(FixedPrediction(pred), x0, t, noise=noise, mask=mask)
    b = d.training_losses(FixedPrediction(pred), garbage, t, noise=noise, mask=mask)
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6), key
    unmasked = d.training_losses(FixedPrediction(pred), garbage, t, noise=noise)
    assert unmasked["loss"].item() != pytest.approx(a["loss"].item(), rel=1e-3)
    # the measured half alone, as a plain mean, gives the same epsilon term
    half = d.training_losses(FixedPrediction(pred[..., 3:]), x0[..., 3:], t, noise=noise[..., 3:])
    assert a["eps_mse"].item() == pytest.approx(half["eps_mse"].item(), rel=1e-5)
    assert a["vlb"].item() == pytest.approx(half["vlb"].item(), rel=1e-5)
