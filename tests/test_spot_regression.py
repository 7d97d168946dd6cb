"""Spot-ratio regression (``train.regression: spot_poisson``) and spot-consistent predictions.

The regression shares each measured LR spot out over its bins, so its counts add up to the spots exactly;
it learns (the deviance falls); a two-stage run on top of it reports the regression as its answer by
default; with ``spot_consistent`` every sample of a diffusion run adds up to the spots too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffst.config import parse_config
from diffst.data.dataset import PreparedTiles
from diffst.data.tiling import block_sum
from diffst.errors import InputError
from diffst.inference.predict import predict_checkpoint
from diffst.training import train
from diffst.training.objectives import poisson_deviance
from test_training import _config as tiny_config


@pytest.fixture(scope="module")
def spot_run(prepared, tmp_path_factory) -> Path:
    """A tiny spot-ratio regression run (40 steps) on ``prepared``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(prepared, tmp_path_factory.mktemp("spot") / "run", steps=40, objective="regression",
                          regression="spot_poisson", lr=3e-3, log_every=1)
        return train(parse_config(cfg))
    finally:
        torch.set_num_threads(before)


def _spot_sums_match(counts: np.ndarray, data: Path, split: str = "test") -> None:
    tiles = PreparedTiles(data, split)
    lr, mask = np.asarray(tiles.lr_counts, np.float64), np.asarray(tiles.lr_mask, bool)
    sums = block_sum(np.asarray(counts, np.float64), tiles.geometry.scale)
    measured = np.broadcast_to(mask[..., None, :, :], sums.shape[-4:])
    np.testing.assert_allclose(sums[..., measured], np.broadcast_to(lr, sums.shape)[..., measured], rtol=1e-3, atol=1e-3)


def test_poisson_deviance_is_zero_at_the_observation_and_positive_elsewhere():
    y = torch.tensor([0.0, 1.0, 3.0, 10.0])
    torch.testing.assert_close(poisson_deviance(y, y), torch.zeros(4), atol=1e-5, rtol=0)
    assert (poisson_deviance(y, y * 1.5 + 0.2) > 0).all()


def _train_deviance(counts: np.ndarray, data: Path) -> float:
    observed = torch.as_tensor(np.asarray(PreparedTiles(data, "train").hr_counts, np.float64))
    return float(poisson_deviance(observed, torch.as_tensor(np.asarray(counts, np.float64))).mean())


def test_spot_regression_learns_and_adds_up_to_the_spots(spot_run, prepared):
    from diffst.core.spots import share_out_spots
    from diffst.diffusion.target import lr_on_hr_grid

    # Learning: on its training tiles the run fits better than its starting point (the prior allocation).
    tiles, fitted, _ = predict_checkpoint(spot_run, prepared, split="train", device="cpu", progress=False)
    lr_model = torch.stack([tiles[i]["lr"] for i in range(len(tiles))])
    prior = tiles.normaliser.to_log1p(lr_on_hr_grid(lr_model, fitted.mean.shape[-2:]))
    start = share_out_spots(prior, torch.tensor(np.asarray(tiles.lr_counts, np.float32)), tiles.geometry.scale)
    assert _train_deviance(fitted.mean, prepared) < 0.95 * _train_deviance(start.numpy(), prepared)
    for spot_consistent in (True, False):  # consistent by construction, with or without the projection
        _, preds, extras = predict_checkpoint(spot_run, prepared, device="cpu", progress=False,
                                              sampler={"spot_consistent": spot_consistent})
        assert np.isfinite(preds.mean).all() and preds.mean.min() >= 0
        _spot_sums_match(preds.mean, prepared)
    assert extras["sampler"]["point_estimate"] == "base"


def test_two_stage_answer_is_the_regression_and_samples_add_up(spot_run, prepared, tmp_path, one_thread):
    cfg = tiny_config(prepared, tmp_path / "two", steps=4, base_run=str(spot_run))
    cfg["diffusion"] = {"target": "regression_residual", "parameterization": "v"}
    run = train(parse_config(cfg))
    sampler = {"steps": 2, "num_samples": 2, "probe_draws": 2}
    _, two, extras = predict_checkpoint(run, prepared, device="cpu", progress=False, sampler=sampler)
    _, reg, _ = predict_checkpoint(spot_run, prepared, device="cpu", progress=False)
    assert extras["sampler"]["point_estimate"] == "base"
    np.testing.assert_allclose(two.mean, reg.mean, rtol=1e-4, atol=1e-4)
    counts = two.samples_model
    from diffst.runs import load_run

    norm = load_run(run).dataset.normaliser
    _spot_sums_match(norm.to_counts(counts), prepared)
    assert (two.std > 0).any()
    _, probe, _ = predict_checkpoint(run, prepared, device="cpu", progress=False,
                                     sampler={**sampler, "point_estimate": "x0_probe"})
    _spot_sums_match(probe.mean, prepared)
    # Without the projection, samples of a barely trained residual diffusion do not add up.
    _, free, _ = predict_checkpoint(run, prepared, device="cpu", progress=False,
                                    sampler={**sampler, "spot_consistent": False})
    with pytest.raises(AssertionError):
        _spot_sums_match(norm.to_counts(free.samples_model), prepared)


def test_base_point_estimate_needs_a_two_stage_run(prepared, tmp_path, one_thread):
    run = train(parse_config(tiny_config(prepared, tmp_path / "plain", steps=1, checkpoint_every=1)))
    with pytest.raises(InputError, match="point_estimate 'base' needs a two-stage run"):
        predict_checkpoint(run, prepared, device="cpu", progress=False,
                           sampler={"steps": 1, "point_estimate": "base"})


def test_cli_trains_both_stages_and_predicts(prepared, tmp_path, one_thread, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from diffst.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(prepared, tmp_path / "run", steps=2)))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--two-stage", "--stage-one-steps", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run-regression").is_dir() and "Stage one" in result.output
    from diffst.runs import load_run

    run = load_run(tmp_path / "run")
    assert run.base is not None and run.base.path.parent.parent == tmp_path / "run-regression"
    assert run.base.step == 3 and run.config.train.regression == "mse" and run.base.config.train.regression == "spot_poisson"
    bad = CliRunner().invoke(app, ["train", "--config", str(config), "--two-stage", "--stage-one-steps", "0"])
    assert bad.exit_code != 0 and "--stage-one-steps must be at least 1" in bad.output
    bad = CliRunner().invoke(app, ["train", "--config", str(config), "--two-stage", "--stage-one-members", "0"])
    assert bad.exit_code != 0 and "--stage-one-members must be at least 1, got 0" in bad.output


def test_bin_image_features_ignore_stain_strength_and_turn_with_the_tile():
    from diffst.models.spot_ratio import STATS_PER_CHANNEL, bin_image_features

    gen = torch.Generator().manual_seed(0)
    tissue = torch.rand(2, 3, 64, 64, generator=gen) ** 3
    feats = bin_image_features(tissue, (16, 16))
    n = 3 * STATS_PER_CHANNEL * 3  # channels x statistics x (bin, 3 x 3, 7 x 7)
    assert feats.shape == (2, n, 16, 16)
    torch.testing.assert_close(feats.mean(dim=(-2, -1)), torch.zeros(2, n), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.std(dim=(-2, -1)), torch.ones(2, n), atol=1e-3, rtol=0)
    # A fainter, offset stain (an affine change of intensity) gives the same features.
    torch.testing.assert_close(bin_image_features(0.5 * tissue + 0.2, (16, 16)), feats, atol=1e-3, rtol=1e-3)
    turned = bin_image_features(torch.rot90(tissue, 1, (-2, -1)), (16, 16))
    torch.testing.assert_close(turned, torch.rot90(feats, 1, (-2, -1)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(bin_image_features(torch.rand(2, 3, 64, 64, generator=gen), (16, 16)), feats)


def test_bin_image_features_see_nuclei_that_the_bin_mean_misses():
    from diffst.models.spot_ratio import bin_image_features

    # Two bins with the same mean intensity: one holds a nucleus-sized bright spot on a dim background, the
    # other a ring-free even stain of the same mean. Mean alone cannot tell them apart; the band-pass can.
    tissue = torch.zeros(1, 1, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / (2 * 1.5**2))
    tissue[0, 0, :16, :16] = blob
    tissue[0, 0, :16, 16:] = blob.mean()
    tissue[0, 0, 16:, :] = torch.linspace(0, 0.2, 32)  # something else in the lower bins
    feats = bin_image_features(tissue, (2, 2))[0]
    mean, band_max = feats[0], feats[2]
    assert torch.isclose(mean[0, 0], mean[0, 1], atol=1e-4)
    assert band_max[0, 0] > band_max[0, 1] + 0.5


def test_spot_ratio_model_starts_as_its_backbone_and_learns_from_the_image(prepared, tmp_path):
    from diffst.config import parse_config
    from diffst.runs import build_run_model

    cfg = parse_config(tiny_config(prepared, tmp_path / "r", steps=1, objective="regression", regression="spot_poisson"))
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_genes": 3, "image_channels": 1})})
    model = build_run_model(cfg)
    x, t = torch.zeros(2, 3, 20, 20), torch.zeros(2, dtype=torch.long)
    cond = {"lr": torch.rand(2, 3, 4, 4), "tissue": torch.rand(2, 1, 128, 128),
            "cells": torch.rand(2, 64, 1, 16, 16), "cell_entropy": torch.rand(2, 64)}
    torch.testing.assert_close(model(x, t, **cond).prediction, model.backbone(x, t, **cond).prediction[:, :3])
    torch.nn.init.normal_(model.image_head.weight)
    other = {**cond, "tissue": torch.rand(2, 1, 128, 128)}
    assert not torch.allclose(model(x, t, **cond).prediction, model(x, t, **other).prediction)


def test_interpolated_shares_leave_out_empty_spots():
    """The allocation a spot-ratio answer is shrunk toward: spot-consistent; a spot beside empty ones is
    shared evenly when its measured neighbours agree, and toward the stronger neighbour when they do not."""
    from diffst.models.spot_ratio import interpolated_shares

    lr = torch.zeros(1, 2, 3, 3)
    lr[:, :, :, 0] = 200.0  # the left column of spots is tissue, the others are empty
    lr[:, 1, :, 0] = torch.tensor([40.0, 160.0, 360.0])
    shares = interpolated_shares(lr, 2)
    torch.testing.assert_close(shares.reshape(1, 2, 3, 2, 3, 2).sum(dim=(3, 5)), lr)
    torch.testing.assert_close(shares[0, 0, 2:4, 0:2], torch.full((2, 2), 50.0))
    middle = shares[0, 1, 2:4, 0:2]
    assert middle[1].sum() > middle[0].sum() and torch.allclose(middle[:, 0], middle[:, 1])
    assert torch.equal(interpolated_shares(lr.flip(-1), 2), shares.flip(-1))


def test_spot_ratio_shrink_mixes_in_the_interpolated_allocation(spot_run, prepared, tmp_path):
    """``train.spot_ratio_shrink``: 0 is the answer alone (as before the field existed, and as saved runs
    without it load), s gives ``(1 - s) * answer + s * interpolated`` in counts, spot-consistent."""
    import yaml
    from torch.utils.data import default_collate

    from diffst.models.base import Conditions
    from diffst.models.spot_ratio import interpolated_shares
    from diffst.runs import _parse_config, load_run, regression_output, regression_point

    run = load_run(spot_run)
    assert run.config.train.spot_ratio_shrink == 0.5  # the default, saved with the run
    tiles = PreparedTiles(prepared, "test", normaliser=run.dataset.normaliser)
    batch = default_collate([tiles[i] for i in range(len(tiles))])
    cond = Conditions.from_batch(batch, run.entropy_threshold)
    shape, norm, scale = tuple(batch["hr"].shape), run.dataset.normaliser, run.dataset.geometry.scale

    def with_shrink(value):
        return run.config.model_copy(update={"train": run.config.train.model_copy(update={"spot_ratio_shrink": value})})

    with torch.no_grad():
        alone = regression_output(run.model, cond, shape, run.config, run.dataset)
        interpolated = interpolated_shares(norm.lr_to_counts(cond.lr, scale), scale)
        torch.testing.assert_close(regression_point(run.model, cond, shape, with_shrink(0.0), run.dataset), alone.maps,
                                   rtol=0, atol=0)
        for value in (0.5, 1.0):
            got = norm.to_counts(regression_point(run.model, cond, shape, with_shrink(value), run.dataset))
            torch.testing.assert_close(got, (1 - value) * alone.counts + value * interpolated, rtol=1e-4, atol=1e-3)
    _spot_sums_match(got.numpy(), prepared)
    saved = yaml.safe_load((Path(spot_run) / "config.yaml").read_text())
    del saved["train"]["spot_ratio_shrink"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _parse_config(tmp_path / "config.yaml").train.spot_ratio_shrink == 0.0
    with pytest.raises(ValueError, match="spot_ratio_shrink"):
        parse_config({**saved, "train": {**saved["train"], "spot_ratio_shrink": 1.5}})
