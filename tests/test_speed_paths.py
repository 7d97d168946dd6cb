"""The fast paths give what the plain ones give: conditions encoded once, K samples as one batch, and the
cross-modal modulation computed without forming the affinity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffst.diffusion.process import GaussianDiffusion
from diffst.diffusion.samplers import sample_k
from diffst.models import ModelConfig, build_model
from diffst.models.base import Conditions, bind_conditions
from diffst.models.cam import CrossModalAdaptiveModulation, _from_windows, _to_windows

N_GENES = 3


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(arch: str = "diffst", **overrides) -> torch.nn.Module:
    """A tiny model whose zero-initialised layers are randomised, so that outputs are not trivially zero."""
    values = dict(arch=arch, n_genes=N_GENES, image_channels=3, base_channels=8, channel_mult=(1, 2),
                  attention_resolutions=(6,), hr_size=12, num_heads=2, d_tissue=8, d_cell=8, d_attn=8,
                  cam_window=4, condition_level=1, graph_node_size=3, graph_hidden=2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**values, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.1)
    return model


def tiny_inputs(batch: int = 2, hr: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditions]:
    gen = torch.Generator().manual_seed(seed)
    cond = Conditions(lr=torch.rand(batch, N_GENES, 3, 3, generator=gen),
                      tissue=torch.rand(batch, 3, 12, 12, generator=gen),
                      cells=torch.rand(batch, 4, 3, 4, 4, generator=gen),
                      cell_entropy=torch.rand(batch, 4, generator=gen) * 5, entropy_threshold=1.0)
    x_t = torch.randn(batch, N_GENES, hr, hr, generator=gen)
    return x_t, torch.tensor([3, 700])[:batch], cond


@pytest.mark.parametrize("overrides", [{}, {"use_cam": False}, {"use_graph": False, "use_disentangle": False},
                                       {"use_hierarchical": False}])
@pytest.mark.parametrize("hr", [12, 11])
def test_encoded_forward_equals_forward(overrides, hr):
    model = tiny_model(**overrides)
    x_t, t, cond = tiny_inputs(hr=hr)
    with torch.no_grad():
        plain = model(x_t, t, **cond)
        encoded = model.encode_conditions((hr, hr), **cond)
        fast = model.forward_encoded(x_t, t, encoded)
    torch.testing.assert_close(fast.prediction, plain.prediction)
    assert plain.prediction.abs().max() > 0
    assert fast.aux_losses.keys() == plain.aux_losses.keys()
    for name in plain.aux_losses:
        torch.testing.assert_close(fast.aux_losses[name], plain.aux_losses[name])


def test_encoded_forward_carries_gradients():
    model = tiny_model().train()
    x_t, t, cond = tiny_inputs()
    out = model.forward_encoded(x_t, t, model.encode_conditions((12, 12), **cond))
    (out.prediction.square().mean() + out.aux_losses["disentangle"]).backward()
    assert model.histology.tissue_encoder.layers[0].weight.grad.abs().sum() > 0
    assert model.unet.input_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["diffst", "guided_dm"])
def test_bound_conditions_serve_k_copies(arch):
    model = tiny_model(arch)
    x_t, t, cond = tiny_inputs()
    with torch.no_grad():
        denoise = bind_conditions(model, cond, (12, 12))
        one = denoise(x_t, t).prediction
        x_k = torch.cat([x_t, x_t.flip(0), x_t * 0.5])
        t_k = torch.cat([t, t.flip(0), t])
        three = denoise(x_k, t_k).prediction
        plain = [model(x, tt, **cond).prediction for x, tt in zip(x_k.split(2), t_k.split(2), strict=True)]
    torch.testing.assert_close(one, model(x_t, t, **cond).prediction)
    torch.testing.assert_close(three, torch.cat(plain), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        denoise(x_t[:1], t[:1])


def test_bound_conditions_encode_once():
    model = tiny_model()
    x_t, t, cond = tiny_inputs()
    calls = []
    handle = model.histology.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        denoise = bind_conditions(model, cond, (12, 12))
        for _ in range(3):
            denoise(x_t, t)
    handle.remove()
    assert len(calls) == 1


def test_batched_k_samples_equal_sequential_for_a_deterministic_sampler():
    model = tiny_model()
    x_t, _, cond = tiny_inputs()
    diffusion = GaussianDiffusion()
    with torch.no_grad():
        denoise = bind_conditions(model, cond, (12, 12))

        def model_fn(x, t):
            return denoise(x, t).prediction

        shape = tuple(x_t.shape)
        apart = sample_k(model_fn, shape, diffusion, "ddim", 4, 3, torch.Generator().manual_seed(1))
        together = sample_k(model_fn, shape, diffusion, "ddim", 4, 3, torch.Generator().manual_seed(1),
                            batch_samples=True)
    for a, b in zip(apart, together, strict=True):  # float rounding differs between batch sizes, nothing else
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def reference_cam(cam: CrossModalAdaptiveModulation, feat_y: torch.Tensor, feat_h: torch.Tensor):
    """CAM as the paper writes it: the affinity formed, the FC applied to it (windows padded and masked)."""
    b, _, height, width = feat_y.shape
    win = cam.window
    pad_h, pad_w = (-height) % win, (-width) % win

    def windows(x):
        return _to_windows(F.pad(x, (0, pad_w, 0, pad_h)), win, win)

    keys_y = windows(cam.key_y(cam.norm_y(feat_y)))
    keys_h = windows(cam.key_h(cam.norm_h(feat_h)))
    valid = windows(torch.ones(1, 1, height, width)).reshape(1, -1, win * win).expand(b, -1, -1)
    valid = valid.reshape(-1, win * win).bool()
    affinity = keys_y @ keys_h.transpose(1, 2) / math.sqrt(keys_y.shape[-1])

    def mix(direction, aff):
        logits = direction.fc(aff).masked_fill(~valid[:, None, :], float("-inf"))
        return logits.softmax(-1)

    values_h, values_y = windows(cam.hist_to_st.value(feat_h)), windows(cam.st_to_hist.value(feat_y))
    full = (height + pad_h, width + pad_w)
    up_y = _from_windows(mix(cam.hist_to_st, affinity) @ values_h, b, *full, win, win)[..., :height, :width]
    up_h = _from_windows(mix(cam.st_to_hist, affinity.transpose(1, 2)) @ values_y, b, *full, win, win)
    return feat_y + cam.hist_to_st.out(up_y), feat_h + cam.st_to_hist.out(up_h[..., :height, :width])


@pytest.mark.parametrize("size", [(8, 8), (10, 7)])
def test_cam_without_the_affinity_matches_the_paper_formula(size):
    torch.manual_seed(0)
    cam = CrossModalAdaptiveModulation(8, 4, 6)
    with torch.no_grad():
        for param in cam.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        feat_y, feat_h = torch.randn(2, 8, *size), torch.randn(2, 8, *size)
        for fast, slow in zip(cam(feat_y, feat_h), reference_cam(cam, feat_y, feat_h), strict=True):
            torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
