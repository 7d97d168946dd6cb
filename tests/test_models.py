"""Tests of the denoisers: shapes at the paper geometry and odd sizes, the co-expression matrix, the
curriculum patch selection, component switches, trainability, determinism and the model registry."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from diffst.core.curriculum import curriculum_threshold, kept_patch_mask, patch_entropy
from diffst.errors import InputError
from diffst.models import (
    MODELS,
    DenoiserOutput,
    DiffST,
    GuidedDMBaseline,
    ModelConfig,
    build_model,
    coexpression_matrix,
    model_preset,
    register_model,
)
from diffst.models.cam import CrossModalAdaptiveModulation

N_GENES = 4


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread; on a shared CPU, extra threads mostly wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough to train a few steps in well under a second."""
    values = dict(
        n_genes=N_GENES,
        image_channels=3,
        base_channels=16,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        hr_size=16,
        num_heads=2,
        d_tissue=16,
        d_cell=16,
        d_attn=16,
        cam_window=4,
        condition_level=1,
        graph_node_size=4,
        graph_hidden=4,
    )
    values.update(overrides)
    return ModelConfig(**values)


def make_batch(
    batch: int = 2,
    n_genes: int = N_GENES,
    hr: int = 16,
    lr: int = 4,
    image: int = 16,
    channels: int = 3,
    n_cells: int = 8,
    patch: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(batch, n_genes, hr, hr, generator=gen),
        t=torch.randint(0, 1000, (batch,), generator=gen),
        lr=torch.rand(batch, n_genes, lr, lr, generator=gen),
        tissue=torch.rand(batch, channels, image, image, generator=gen),
        cells=torch.rand(batch, n_cells, channels, patch, patch, generator=gen),
        cell_entropy=torch.rand(batch, n_cells, generator=gen) * 5,
    )


def run(model, batch, threshold=None) -> DenoiserOutput:
    conditions = {k: v for k, v in batch.items() if k not in ("x_t", "t")}
    return model(batch["x_t"], batch["t"], **conditions, entropy_threshold=threshold)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- shapes -------------------------------------------------------------------------------------------


def test_paper_geometry_output_shape():
    torch.set_num_threads(os.cpu_count() or 1)  # the one big model: use every core
    torch.manual_seed(0)
    model = build_model(model_preset("paper", n_genes=25, image_channels=3)).eval()
    batch = make_batch(batch=1, n_genes=25, hr=256, lr=26, image=256, n_cells=256, patch=16)
    with torch.no_grad():
        out = run(model, batch)
    assert isinstance(out, DenoiserOutput)
    assert out.prediction.shape == (1, 50, 256, 256)
    assert torch.isfinite(out.prediction).all()


@pytest.mark.parametrize(
    ("hr", "lr", "image", "channels"),
    [(20, 2, 20, 3), (130, 26, 64, 3), (20, 2, 20, 1), (33, 7, 48, 1)],
)
@pytest.mark.parametrize("arch", ["diffst", "guided_dm"])
def test_any_size_and_dapi(hr, lr, image, channels, arch):
    torch.manual_seed(0)
    cfg = model_preset("cpu", n_genes=N_GENES, image_channels=channels, arch=arch)
    model = build_model(cfg).eval()
    batch = make_batch(batch=1, hr=hr, lr=lr, image=image, channels=channels, n_cells=16, patch=8)
    with torch.no_grad():
        out = run(model, batch, threshold=2.0)
    assert out.prediction.shape == (1, 2 * N_GENES, hr, hr)
    assert torch.isfinite(out.prediction).all()


def test_learn_sigma_off_gives_n_channels():
    model = build_model(tiny_config(learn_sigma=False)).eval()
    with torch.no_grad():
        assert run(model, make_batch()).prediction.shape == (2, N_GENES, 16, 16)


def test_cam_handles_indivisible_and_small_maps():
    torch.manual_seed(0)
    cam = CrossModalAdaptiveModulation(channels=8, window=8, d_affinity=8)
    for size in [(5, 5), (11, 13), (16, 16), (3, 20)]:
        feat_y, feat_h = torch.randn(2, 8, *size), torch.randn(2, 8, *size)
        out_y, out_h = cam(feat_y, feat_h)
        assert out_y.shape == feat_y.shape and out_h.shape == feat_h.shape
        assert torch.isfinite(out_y).all() and torch.isfinite(out_h).all()


def test_cam_shrunk_window_equals_padded_window():
    """A 6-pixel window shrunk to a 4x4 map equals the full 6x6 window with the padding masked out."""
    torch.manual_seed(0)
    cam = CrossModalAdaptiveModulation(channels=4, window=6, d_affinity=4)
    with torch.no_grad():
        cam.hist_to_st.fc.weight.normal_()  # a non-identity filter, so the sub-block choice matters
        cam.hist_to_st.fc.bias.normal_()
        feat_y, feat_h = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
        small_y, _ = cam(feat_y, feat_h)

        # Reference: zero-padded 6x6 keys and values, padded keys masked, full 36 x 36 FC.
        def padded_tokens(x):
            return F.pad(x, (0, 2, 0, 2)).flatten(2).transpose(1, 2)

        keys_y = padded_tokens(cam.key_y(cam.norm_y(feat_y)))
        keys_h = padded_tokens(cam.key_h(cam.norm_h(feat_h)))
        affinity = keys_y @ keys_h.transpose(1, 2) * cam.scale
        valid = torch.zeros(1, 6, 6, dtype=torch.bool)
        valid[:, :4, :4] = True
        logits = F.linear(affinity, cam.hist_to_st.fc.weight, cam.hist_to_st.fc.bias)
        mixing = logits.masked_fill(~valid.reshape(1, 1, 36), float("-inf")).softmax(dim=-1)
        values = padded_tokens(cam.hist_to_st.value(feat_h))
        update = (mixing @ values).transpose(1, 2).reshape(1, 4, 6, 6)[..., :4, :4]
        expected = feat_y + cam.hist_to_st.out(update)
    torch.testing.assert_close(small_y, expected, rtol=1e-4, atol=1e-5)


# --- co-expression ------------------------------------------------------------------------------------


def test_coexpression_matrix_from_data():
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.3, size=(3, 4, 10, 10)).astype(float)
    counts[:, 1] = counts[:, 0]  # genes 0 and 1 always together
    counts[:, 2] = 0
    counts[:, 2, :5] = 2  # genes 2 and 3 in disjoint halves: never together
    counts[:, 3] = 0
    counts[:, 3, 5:] = 2
    matrix = coexpression_matrix(counts)
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(matrix, matrix.T)
    assert matrix[0, 1] > matrix[2, 3]
    raw = coexpression_matrix(counts, normalize=False)
    assert raw[0, 1] == pytest.approx(1.0) and raw[2, 3] == pytest.approx(0.0)
    assert np.all((raw >= 0) & (raw <= 1))
    # The (bins, N) table gives the same matrix, deterministically.
    table = np.moveaxis(counts, 1, -1).reshape(-1, 4)
    np.testing.assert_allclose(coexpression_matrix(table), matrix)
    # Different data, different matrix.
    shuffled = counts.copy()
    shuffled[:, 1] = rng.permutation(shuffled[:, 1].reshape(-1)).reshape(shuffled[:, 1].shape)
    assert not np.allclose(coexpression_matrix(shuffled), matrix)


def test_set_coexpression_changes_output_and_validates():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    batch = make_batch()
    with torch.no_grad():
        model.unet.out[-1].weight.normal_()  # the zero-initialised output conv would hide every change
        before = run(model, batch).prediction
        model.set_coexpression(np.full((N_GENES, N_GENES), 1.0 / N_GENES))
        after = run(model, batch).prediction
    assert not torch.allclose(before, after)
    with pytest.raises(ValueError):
        model.set_coexpression(np.eye(N_GENES + 1))


# --- curriculum ---------------------------------------------------------------------------------------


def test_fewer_patches_kept_as_threshold_rises():
    entropy = torch.rand(3, 32) * 6
    counts = [kept_patch_mask(entropy, g).sum().item() for g in [None, 0.0, 1.0, 3.0, 5.0, 100.0]]
    assert counts[0] == 3 * 32
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[-1] == 3  # the most complex patch of each tile is always kept


def test_curriculum_threshold_is_non_decreasing():
    entropies = np.random.default_rng(1).uniform(0, 6, size=500)
    gammas = [curriculum_threshold(p, entropies) for p in np.linspace(0, 1, 41)]
    assert all(a <= b for a, b in zip(gammas, gammas[1:], strict=False))
    assert gammas[0] == float("-inf") and gammas[-1] == pytest.approx(np.quantile(entropies, 0.75))
    assert curriculum_threshold(0.3, torch.as_tensor(entropies)) == pytest.approx(np.median(entropies))


def test_patch_entropy_is_the_entropy_of_the_8_bit_grey_patch():
    from skimage.measure import shannon_entropy

    patch = np.random.default_rng(2).uniform(0, 1, size=(20, 20, 3)).astype(np.float32)
    grey = (patch.mean(axis=-1) * 255).astype(np.uint8)
    assert patch_entropy(patch) == shannon_entropy(grey) > 0
    assert patch_entropy(np.full((8, 8, 1), 0.5, dtype=np.float32)) == 0.0  # a flat patch holds no information


def test_entropy_threshold_changes_hierarchical_output_only():
    torch.manual_seed(0)
    batch = make_batch()
    for hierarchical in (True, False):
        model = build_model(tiny_config(use_hierarchical=hierarchical)).eval()
        with torch.no_grad():
            model.unet.out[-1].weight.normal_()
            all_patches = run(model, batch, threshold=None).prediction
            few_patches = run(model, batch, threshold=4.0).prediction
        assert torch.allclose(all_patches, few_patches) != hierarchical


# --- switches, training, determinism ------------------------------------------------------------------

SWITCHES = ["use_hierarchical", "use_cam", "use_graph", "use_disentangle"]


@pytest.mark.parametrize("switch", [None, *SWITCHES])
def test_component_switch_trains(switch):
    overrides = {switch: False} if switch else {}
    torch.manual_seed(0)
    model = build_model(tiny_config(**overrides))
    if switch:
        torch.manual_seed(0)
        assert n_params(model) != n_params(build_model(tiny_config()))
    model.set_coexpression(coexpression_matrix(np.random.default_rng(0).poisson(1.0, (2, N_GENES, 8, 8))))
    batch = make_batch()
    noise = torch.randn_like(batch["x_t"], generator=torch.Generator().manual_seed(1))
    batch["x_t"] = 0.5 * batch["x_t"] + noise
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-5)
    losses = []
    for _ in range(8):
        out = run(model, batch, threshold=2.0)
        loss = F.mse_loss(out.prediction[:, :N_GENES], noise) + 0.01 * sum(out.aux_losses.values())
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert ("disentangle" in out.aux_losses) == (switch != "use_disentangle")


def test_guided_dm_has_no_aux_losses_and_ignores_cells():
    torch.manual_seed(0)
    model = build_model(tiny_config(arch="guided_dm")).eval()
    assert isinstance(model, GuidedDMBaseline)
    batch = make_batch()
    with torch.no_grad():
        model.unet.out[-1].weight.normal_()
        out = run(model, batch)
        without_cells = model(batch["x_t"], batch["t"], lr=batch["lr"], tissue=batch["tissue"])
    assert out.aux_losses == {}
    model.set_coexpression(np.eye(N_GENES))  # accepted, no effect
    torch.testing.assert_close(out.prediction, without_cells.prediction)


def test_outputs_deterministic_under_seed():
    batch = make_batch()
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(tiny_config())
        assert isinstance(model, DiffST)
        with torch.no_grad():
            model.unet.out[-1].weight.normal_()
            outputs.append(run(model, batch, threshold=1.0).prediction)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_float_timesteps_accepted():
    model = build_model(tiny_config()).eval()
    batch = make_batch()
    batch["t"] = batch["t"].float() + 0.5
    with torch.no_grad():
        assert run(model, batch).prediction.shape == (2, 2 * N_GENES, 16, 16)


# --- configuration ------------------------------------------------------------------------------------


def test_config_roundtrip_and_validation():
    cfg = model_preset("paper", n_genes=25, image_channels=1)
    assert cfg.d_tissue == cfg.d_cell == cfg.d_attn == 128 and cfg.cam_window == 32
    assert cfg.graph_alpha == 0.2 and cfg.base_channels == 32 and cfg.num_res_blocks == 1
    assert cfg.channel_mult == (1, 2, 4, 8)  # about the authors' parameter budget
    assert cfg.attention_resolutions == (32, 16, 8) and cfg.learn_sigma
    assert ModelConfig(**cfg.model_dump()) == cfg
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError):
        ModelConfig(condition_level=9)
    with pytest.raises(ValidationError):
        ModelConfig(arch="no_such_model")
    with pytest.raises(ValueError):
        model_preset("huge")


def test_wrong_inputs_fail_with_clear_errors():
    from diffst.errors import InputError

    model = build_model(tiny_config(image_channels=1)).eval()
    batch = make_batch(channels=1)
    with pytest.raises(InputError, match="tissue"):
        model(batch["x_t"], batch["t"], lr=batch["lr"], tissue=torch.rand(2, 3, 16, 16),
              cells=batch["cells"], cell_entropy=batch["cell_entropy"])
    with pytest.raises(InputError, match="lr"):
        model(batch["x_t"], batch["t"], lr=batch["lr"][:, :2], tissue=batch["tissue"],
              cells=batch["cells"], cell_entropy=batch["cell_entropy"])
    with pytest.raises(InputError, match="cells"):
        model(batch["x_t"], batch["t"], lr=batch["lr"], tissue=batch["tissue"])


# --- registry -----------------------------------------------------------------------------------------


def test_both_models_are_registered():
    assert MODELS["diffst"] is DiffST and MODELS["guided_dm"] is GuidedDMBaseline


def test_a_registered_model_is_built_by_name():
    @register_model("tiny_test_model")
    class TinyModel(torch.nn.Module):
        def __init__(self, cfg: ModelConfig):
            super().__init__()
            self.cfg = cfg
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x_t, t, **conditions):
            return DenoiserOutput(prediction=x_t * self.scale)

    try:
        cfg = tiny_config(arch="tiny_test_model")
        model = build_model(cfg)
        assert isinstance(model, TinyModel) and model.cfg is cfg
        assert ModelConfig(**cfg.model_dump()) == cfg  # the name round-trips like any other config
        x = torch.randn(1, N_GENES, 8, 8)
        assert torch.equal(model(x, torch.zeros(1)).prediction, x)
    finally:
        MODELS.pop("tiny_test_model")


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(InputError, match=r"Unknown model 'no_such_model': registered models are \[.*'diffst', 'guided_dm'.*\]"):
        build_model(ModelConfig.model_construct(**{**tiny_config().model_dump(), "arch": "no_such_model"}))
    with pytest.raises(ValidationError, match=r"registered models are \[.*'diffst', 'guided_dm'.*\]"):
        ModelConfig(arch="no_such_model")


def test_a_taken_name_cannot_be_registered_again():
    with pytest.raises(InputError, match="already registered"):
        @register_model("diffst")
        class Impostor(torch.nn.Module):
            pass
    assert MODELS["diffst"] is DiffST
