"""The regressor baselines (U-Net, U-Net++, Attention U-Net, HisToGene): registry, shapes on any HR grid, which
inputs they use, one real regression training through the trainer, and their benchmark methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffst.benchmark.methods import LEARNED, METHODS, parse_methods, run_config
from diffst.config import parse_config
from diffst.errors import InputError
from diffst.models import MODELS, ModelConfig, build_model, model_preset
from diffst.models.baselines import (
    AttentionUNetRegressor,
    HisToGeneRegressor,
    UNetPlusPlusRegressor,
    UNetRegressor,
)
from diffst.runs import load_run
from diffst.training import train
from test_training import _config as tiny_run_config
from test_training import _read_metrics

N_GENES = 4
CLASSES = {"unet": UNetRegressor, "unetpp": UNetPlusPlusRegressor, "attention_unet": AttentionUNetRegressor,
           "histogene": HisToGeneRegressor}
ARCHS = tuple(CLASSES)


def small_config(arch: str, **overrides) -> ModelConfig:
    """Four levels (inputs padded to a multiple of 8, so 20 x 20 is padded and cropped), a few thousand weights."""
    values = dict(arch=arch, n_genes=N_GENES, image_channels=3, base_channels=4, channel_mult=(1, 2, 2, 2),
                  num_heads=2, hr_size=20, attention_resolutions=(10,))
    values.update(overrides)
    return ModelConfig(**values)


def make_inputs(hr: tuple[int, int], lr: int = 4, image: int = 40, channels: int = 3, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.zeros(batch, N_GENES, *hr),
        t=torch.zeros(batch, dtype=torch.long),
        lr=torch.rand(batch, N_GENES, lr, lr, generator=gen) * 2 - 1,
        tissue=torch.rand(batch, channels, image, image, generator=gen),
    )


def predict(model, inputs: dict, **changes) -> torch.Tensor:
    values = {**inputs, **changes}
    x_t, t = values.pop("x_t"), values.pop("t")
    with torch.no_grad():
        return model(x_t, t, **values).prediction


@pytest.fixture
def seeded(one_thread):
    torch.manual_seed(0)


def test_the_four_are_registered_by_importing_diffst_models():
    for arch, cls in CLASSES.items():
        assert MODELS[arch] is cls


@pytest.mark.parametrize("hr", [(20, 20), (16, 16), (13, 10)])
@pytest.mark.parametrize("arch", ARCHS)
def test_builds_by_name_and_predicts_on_the_hr_grid(arch, hr, seeded):
    model = build_model(small_config(arch)).eval()
    assert type(model) is CLASSES[arch]
    out = model(**{k: v for k, v in make_inputs(hr).items() if k not in ("x_t", "t")},
                 x_t=torch.zeros(2, N_GENES, *hr), t=torch.zeros(2))
    assert out.prediction.shape == (2, 2 * N_GENES, *hr)  # learn_sigma: 2N channels, like every denoiser
    assert torch.isfinite(out.prediction).all() and out.aux_losses == {}
    no_sigma = build_model(small_config(arch, learn_sigma=False)).eval()
    assert predict(no_sigma, make_inputs(hr)).shape == (2, N_GENES, *hr)


@pytest.mark.parametrize("arch", ARCHS)
def test_uses_tissue_and_lr_and_ignores_noisy_input_timestep_and_cells(arch, seeded):
    model = build_model(small_config(arch, learn_sigma=False)).eval()
    inputs = make_inputs((20, 20))
    ref = predict(model, inputs)
    gen = torch.Generator().manual_seed(1)
    # x_t, t and cell patches change nothing.
    same = predict(model, inputs, x_t=torch.randn(2, N_GENES, 20, 20, generator=gen), t=torch.tensor([999, 17]),
                   cells=torch.rand(2, 5, 3, 8, 8, generator=gen), cell_entropy=torch.rand(2, 5, generator=gen),
                   entropy_threshold=1.0)
    assert torch.equal(same, ref)
    # Another tissue image (same LR) or other LR maps (same image) change the prediction.
    other_tissue = predict(model, inputs, tissue=torch.rand(2, 3, 40, 40, generator=gen))
    other_lr = predict(model, inputs, lr=torch.rand(2, N_GENES, 4, 4, generator=gen) * 2 - 1)
    assert (other_tissue - ref).abs().max() > 1e-4
    assert (other_lr - ref).abs().max() > 1e-4
    # Each tile's prediction depends on its own conditions only.
    flipped = predict(model, inputs, tissue=torch.cat([inputs["tissue"][:1], inputs["tissue"][1:].flip(-1)]))
    torch.testing.assert_close(flipped[0], ref[0])
    assert (flipped[1] - ref[1]).abs().max() > 1e-4
    # No gene graph: the co-expression matrix is accepted and ignored.
    model.set_coexpression(np.eye(N_GENES, dtype=np.float32))
    assert torch.equal(predict(model, inputs), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_inputs_fail_with_clear_errors(arch):
    model = build_model(small_config(arch))
    inputs = make_inputs((16, 16))
    with pytest.raises(InputError, match="lr must be"):
        predict(model, inputs, lr=torch.rand(2, N_GENES + 1, 4, 4))
    with pytest.raises(InputError, match="image_channels=3"):
        predict(model, inputs, tissue=torch.rand(2, 1, 40, 40))


def test_cpu_preset_sizes_are_comparable_to_diffst():
    def count(arch):
        return sum(p.numel() for p in build_model(model_preset("cpu", n_genes=25, image_channels=1, arch=arch,
                                                               hr_size=20, attention_resolutions=(10,))).parameters())

    reference = count("diffst")
    for arch in ARCHS:
        assert 0.5 * reference < count(arch) < 2 * reference, arch


@pytest.mark.parametrize("arch", ARCHS)
def test_regression_training_lowers_the_loss_and_predicts(prepared, tmp_path, one_thread, arch):
    from diffst.inference.predict import predict_checkpoint

    data = tiny_run_config(prepared, tmp_path / arch, steps=40, lr=2e-3, checkpoint_every=40, curriculum=False,
                           objective="regression")
    data["model"] = {"arch": arch}
    # One real tile, four copies per batch: the loss can only fall if the optimiser fits it.
    data["data"].update(subset=[0, 0, 0, 0], batch_size=4, augment=False)
    run_dir = train(parse_config(data))
    losses = [float(r["mse"]) for r in _read_metrics(run_dir)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    run = load_run(run_dir)
    assert type(run.model) is CLASSES[arch] and run.config.model_config_resolved().arch == arch
    _, preds, _ = predict_checkpoint(run_dir, prepared, split="test", device="cpu", seed=0, progress=False)
    assert preds.mean.shape[1:] == (8, 20, 20) and np.isfinite(preds.mean).all()


def test_benchmark_methods_build_their_models_for_both_budgets(tmp_path):
    names = ["unet", "unetpp", "attention-unet", "histogene", "guided-dm"]
    assert parse_methods(",".join(names)) == names
    assert set(names) <= set(METHODS) and set(names) <= set(LEARNED)
    expected = {"unet": ("unet", "regression"), "unetpp": ("unetpp", "regression"),
                "attention-unet": ("attention_unet", "regression"), "histogene": ("histogene", "regression"),
                "guided-dm": ("guided_dm", "diffusion")}
    for budget in ("tiny", "full"):
        for name, (arch, objective) in expected.items():
            cfg = run_config(name, tmp_path / "data", tmp_path / name, budget, seed=0, device="cpu")
            model_cfg = cfg.model.build(n_genes=8, image_channels=1, learn_sigma=cfg.diffusion.learn_sigma)
            assert (model_cfg.arch, cfg.train.objective) == (arch, objective), (name, budget)
            assert isinstance(build_model(model_cfg), MODELS[arch])
    with pytest.raises(InputError, match="unet-plus"):
        parse_methods("unet,unet-plus")
