"""Self-supervised mode on spot-only slides: the slide's own spots are the HR ground truth.

Real data: the built-in Xenium crop aggregated into Visium-like spots (55 µm discs on a hexagonal array of
100 µm pitch, :func:`diffst.testing.spots.spots_from_transcripts`), prepared with ``--self-supervised`` at
s = 2 (HR bin = the pitch, LR = 2 x 2 blocks of spots), a tiny spot-ratio regression trained on it, and the
held-out region predicted. Checks the hexagonal-to-square placement (one spot per bin, two centres in one
bin averaged), the masks (a spot removed leaves its bin and its block unmeasured), that the losses and the
metrics ignore unmeasured bins, and that old (v1) prepared datasets still read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from diffst.core.geometry import spot_pitch_geometry, spot_pitch_um, tile_preset
from diffst.core.sample import Sample, SpotTable
from diffst.data.dataset import PreparedTiles
from diffst.data.prepare import SplitSpec, prepare_dataset
from diffst.data.tiling import block_sum
from diffst.errors import GeometryError, InputError
from diffst.example import EXAMPLE_TEST_REGION, load_example
from diffst.testing.spots import spot_lattice, spots_from_transcripts

runner = CliRunner()
# Spots removed from the array (nearest to these points), as Visium drops spots off the tissue: one in the
# training region and one in the held-out region, so both have unmeasured bins.
DROPPED_NEAR = ((1300.0, 330.0), (1490.0, 240.0))


def _drop_spots(sample: Sample, near) -> Sample:
    xy = sample.spots.xy_um
    gone = {int(np.argmin(((xy - p) ** 2).sum(axis=1))) for p in near}
    keep = np.array([i not in gone for i in range(len(xy))])
    table = SpotTable(sample.spots.counts[keep], xy[keep], sample.spots.diameter_um, sample.spots.pitch_um,
                      np.asarray(sample.spots.ids)[keep])
    return Sample(sample.name, sample.genes, sample.image, spots=table, platform=sample.platform, meta=sample.meta)


@pytest.fixture(scope="module")
def visium_like() -> Sample:
    """The real crop as Visium-like spots (hexagonal, 100 µm pitch, 55 µm discs), two spots removed."""
    return _drop_spots(spots_from_transcripts(load_example(), pitch_um=100.0, diameter_um=55.0), DROPPED_NEAR)


@pytest.fixture(scope="module")
def self_prepared(visium_like, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("self_supervised") / "prep"
    geom = spot_pitch_geometry(visium_like, scale=2)
    return prepare_dataset([visium_like], out, geom, n_genes=6, split=SplitSpec(test_region=EXAMPLE_TEST_REGION),
                           progress=False, preview=False, self_supervised=True)


@pytest.fixture(scope="module")
def self_run(self_prepared, tmp_path_factory) -> Path:
    """A tiny spot-ratio regression (12 steps) trained on the slide's own spots."""
    from diffst.config import parse_config
    from diffst.training import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = dict(preset="tiny", data=dict(path=str(self_prepared)), model={}, seed=3,
                   run_dir=str(tmp_path_factory.mktemp("self_run") / "run"),
                   train=dict(steps=12, objective="regression", regression="spot_poisson", lr=3e-3))
        return train(parse_config(cfg))
    finally:
        torch.set_num_threads(before)


# -- geometry ----------------------------------------------------------------------------------------------


def test_pitch_and_geometry_from_the_spots(visium_like):
    for layout in ("hex", "square"):
        xy = spot_lattice((0, 0, 1000, 800), 100.0, layout)
        assert spot_pitch_um(xy) == pytest.approx(100.0)
    geom = spot_pitch_geometry(visium_like, scale=2)
    assert geom.hr_bin_um == pytest.approx(100.0) and geom.lr_bin_um == pytest.approx(200.0)
    assert geom.scale == 2 and geom.tile_lr == 1  # the crop is 382 µm tall: one 200 µm LR bin per tile side
    assert geom.image_px >= geom.tissue_px
    with pytest.raises(InputError, match="point data"):
        spot_pitch_geometry(load_example(), scale=2)
    with pytest.raises(GeometryError, match=">= 2"):
        spot_pitch_geometry(visium_like, scale=1)


def test_self_supervised_needs_spots_and_a_pitch_sized_bin(visium_like, tmp_path):
    with pytest.raises(GeometryError, match="spot_pitch_geometry"):
        prepare_dataset([visium_like], tmp_path / "a", tile_preset("cpu", 5), n_genes=4, progress=False,
                        preview=False, self_supervised=True)
    with pytest.raises(InputError, match="spot-only"):
        prepare_dataset([load_example()], tmp_path / "b", spot_pitch_geometry(visium_like, 2), n_genes=4,
                        progress=False, preview=False, self_supervised=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- tiles: hexagonal spots on square bins, masks -------------------------------------------------------------


def test_spots_become_hr_bins_with_masks(self_prepared, visium_like):
    meta = json.loads((self_prepared / "dataset.json").read_text())
    assert meta["has_hr"] and meta["self_supervised"] and meta["format_version"] == 2
    genes = meta["genes"]
    cols = visium_like.gene_indices(genes)
    xy, counts = visium_like.spots.xy_um, visium_like.spots.counts[:, cols].toarray()
    seen_double = seen_masked = 0
    for split in ("train", "test"):
        tiles = PreparedTiles(self_prepared, split)
        geom, hr, hr_mask = tiles.geometry, np.asarray(tiles.hr_counts), np.asarray(tiles.hr_mask)
        lr, lr_mask = np.asarray(tiles.lr_counts), np.asarray(tiles.lr_mask)
        assert hr.shape == (len(tiles), 6, 2, 2) and hr_mask.shape == (len(tiles), 2, 2)
        assert lr.shape == (len(tiles), 6, 1, 1) and lr_mask.shape == (len(tiles), 1, 1)
        for t, row in tiles.tiles.iterrows():
            for r in range(geom.tile_hr):
                for c in range(geom.tile_hr):
                    x0 = row.x0_um + c * geom.hr_bin_um
                    y0 = row.y0_um + r * geom.hr_bin_um
                    inside = ((xy[:, 0] >= x0) & (xy[:, 0] < x0 + geom.hr_bin_um)
                              & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + geom.hr_bin_um))
                    assert hr_mask[t, r, c] == inside.any()
                    expected = counts[inside].mean(axis=0) if inside.any() else np.zeros(len(genes))
                    np.testing.assert_allclose(hr[t, :, r, c], expected, rtol=1e-6)  # two centres: their mean
                    seen_double += int(inside.sum() == 2)
                    seen_masked += int(not inside.any())
        # LR: block sums where every bin of the block holds a spot, else 0 and unmeasured.
        full = hr_mask.reshape(len(tiles), 1, 2, 1, 2).all(axis=(2, 4))
        np.testing.assert_array_equal(lr_mask, full)
        np.testing.assert_allclose(lr, np.where(full[:, None], block_sum(hr, 2), 0.0), rtol=1e-6)
    assert seen_double > 0, "the hexagonal rows 87 µm apart put two spot centres in some 100 µm bins"
    assert seen_masked > 0, "the removed spots leave bins unmeasured"


def test_point_data_get_an_all_true_hr_mask_and_v1_datasets_still_read(prepared, tmp_path):
    tiles = PreparedTiles(prepared, "train")
    assert np.asarray(tiles.hr_mask).all() and tiles.hr_mask.shape == (len(tiles), *tiles.hr_counts.shape[-2:])
    assert tiles[0]["hr_mask"].dtype == torch.bool and tiles[0]["hr_mask"].all()
    old = tmp_path / "v1"
    shutil.copytree(prepared, old)
    for mask in old.glob("*/hr_mask.npy"):
        mask.unlink()
    meta = json.loads((old / "dataset.json").read_text())
    meta["format_version"] = 1
    (old / "dataset.json").write_text(json.dumps(meta))
    v1 = PreparedTiles(old, "train", augment=True)
    assert np.asarray(v1.hr_mask).all() and v1[0]["hr_mask"].all()
    meta["format_version"] = 99
    (old / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="v1, v2"):
        PreparedTiles(old, "train")


def test_augmentation_moves_the_hr_mask_with_the_maps(self_prepared):
    plain = PreparedTiles(self_prepared, "train")
    masked = [i for i in range(len(plain)) if not np.asarray(plain.hr_mask[i]).all()]
    assert masked
    aug = PreparedTiles(self_prepared, "train", augment=True)
    for seed in range(8):
        aug.set_rng(np.random.default_rng(seed))
        item = aug[masked[0]]
        # Unmeasured bins hold no counts wherever the symmetry moved them.
        zero = item["hr"] <= -1.0 + 1e-6
        assert zero[:, ~item["hr_mask"]].all()


# -- losses and metrics ignore unmeasured bins ------------------------------------------------------------------


class _Constant(nn.Module):
    """A stand-in denoiser: a learnable constant map (regression output does not depend on the input)."""

    def __init__(self, n: int, side: int):
        super().__init__()
        self.value = nn.Parameter(torch.linspace(-0.5, 0.5, n * side * side).reshape(1, n, side, side))

    def forward(self, x_t, t, **conditions):
        from diffst.models.base import DenoiserOutput

        copies = self.value.shape[1] // x_t.shape[1]  # 2 with a learned variance
        return DenoiserOutput(torch.cat([x_t] * copies, dim=1) + self.value)


@pytest.mark.parametrize("regression", ["mse", "spot_poisson", "diffusion"])
def test_losses_ignore_unmeasured_bins(self_prepared, regression):
    from diffst.config import parse_config
    from diffst.runs import DatasetSpec
    from diffst.training.objectives import make_objective

    tiles = PreparedTiles(self_prepared, "train")
    batch = {k: torch.stack([tiles[i][k] for i in range(len(tiles))]) for k in tiles[0]}
    # Every block measured in the batch, so spot_poisson's LR mask keeps all bins; then hide one HR bin.
    batch["lr_mask"] = torch.ones_like(batch["lr_mask"])
    batch["hr_mask"] = torch.ones_like(batch["hr_mask"])
    batch["hr_mask"][0, 0, 1] = False
    train = dict(objective="diffusion") if regression == "diffusion" else dict(objective="regression",
                                                                                 regression=regression)
    cfg = parse_config(dict(preset="tiny", data=dict(path=str(self_prepared)), run_dir="unused", train=train))
    objective = make_objective(cfg, None, DatasetSpec.from_tiles(tiles))
    model = _Constant(len(tiles.genes) * (2 if cfg.diffusion.learn_sigma else 1), tiles.geometry.tile_hr)

    def loss(b):  # the diffusion draws its timesteps and noise from the generator: the same for every call
        gen = torch.Generator().manual_seed(0)
        return float(objective(model, b, None, gen, torch.device("cpu"))[0].detach())

    changed = {**batch, "hr": batch["hr"].clone()}
    changed["hr"][0, :, 0, 1] += 0.7  # only the unmeasured bin
    assert loss(changed) == pytest.approx(loss(batch), rel=1e-6)
    measured = {**changed, "hr_mask": torch.ones_like(batch["hr_mask"])}
    assert loss(measured) != pytest.approx(loss(batch), rel=1e-6)  # the same change counts where measured


def test_metrics_ignore_unmeasured_bins(self_prepared):
    from diffst.evaluation.report import evaluate_split

    tiles = PreparedTiles(self_prepared, "test")
    mask = np.asarray(tiles.hr_mask)
    assert not mask.all()
    truth = np.asarray(tiles.hr_counts)
    rng = np.random.default_rng(0)
    pred = truth + rng.poisson(2.0, truth.shape)
    other = np.where(mask[:, None], pred, 1e3)  # wild values only where nothing was measured
    a, b = evaluate_split(tiles, {"p": pred})["p"], evaluate_split(tiles, {"p": other})["p"]
    for key in ("pcc", "pcc_pooled", "rmse_counts", "mae_counts", "paper_rmse", "rmse_model"):
        assert a[key] == pytest.approx(b[key], nan_ok=True), key
    assert 0 < a["measured_fraction"] < 1
    assert a["rmse_counts"] == pytest.approx(np.sqrt(np.mean((pred - truth)[np.broadcast_to(mask[:, None], truth.shape)] ** 2)))


# -- the whole path: CLI prepare, train on the slide itself, predict the held-out region ---------------------------


def test_self_supervised_end_to_end(self_run, self_prepared):
    from diffst.inference.predict import predict_checkpoint

    tiles, preds, _ = predict_checkpoint(self_run, self_prepared, split="test", device="cpu", progress=False)
    mean = np.asarray(preds.mean)
    geom = tiles.geometry
    assert mean.shape == (len(tiles), len(tiles.genes), geom.tile_hr, geom.tile_hr)
    assert np.isfinite(mean).all() and mean.min() >= 0
    lr, lr_mask = np.asarray(tiles.lr_counts, np.float64), np.asarray(tiles.lr_mask, bool)
    assert lr_mask.any() and not np.asarray(tiles.hr_mask).all()
    sums = block_sum(mean.astype(np.float64), geom.scale)
    measured = np.broadcast_to(lr_mask[:, None], sums.shape)
    np.testing.assert_allclose(sums[measured], lr[measured], rtol=1e-3, atol=1e-3)
    # Scored on the measured bins of the held-out spots, beside bicubic.
    from diffst.evaluation.report import evaluate_split

    metrics = evaluate_split(tiles, {"diffst": mean})
    assert set(metrics) == {"bicubic", "diffst"}
    assert np.isfinite(metrics["diffst"]["rmse_counts"]) and 0 < metrics["diffst"]["measured_fraction"] < 1


def test_cli_prepare_self_supervised(visium_like, tmp_path):
    import anndata as ad
    import tifffile

    from diffst.cli import app

    image = visium_like.image
    px = image.pixel_size_um
    x0, y0 = image.extent_um()[:2]
    tifffile.imwrite(tmp_path / "dapi.tif", image.read_px(0, 0, *image.shape_px)[..., 0])
    adata = ad.AnnData(X=visium_like.spots.counts.astype(np.float32))
    adata.var_names = visium_like.genes
    adata.obs_names = list(visium_like.spots.ids)
    adata.obsm["spatial"] = (visium_like.spots.xy_um - [x0, y0]) / px  # pixels of the image, origin (0, 0)
    adata.write_h5ad(tmp_path / "spots.h5ad")
    t = EXAMPLE_TEST_REGION
    region = f"{t[0] - x0:g},{t[1] - y0:g},{t[2] - x0:g},{t[3] - y0:g}"
    common = ["prepare", str(tmp_path / "spots.h5ad"), "--image", str(tmp_path / "dapi.tif"), "--pixel-size",
              str(px), "--n-genes", "6", "--test-region", region]
    result = runner.invoke(app, [*common, "--self-supervised", "--scale", "2", "--out", str(tmp_path / "ss")])
    assert result.exit_code == 0, result.output
    assert "HR 2x2 at 100 µm (s=2)" in result.output
    meta = json.loads((tmp_path / "ss" / "dataset.json").read_text())
    assert meta["self_supervised"] and meta["geometry"]["hr_bin_um"] == pytest.approx(100.0)
    assert (tmp_path / "ss" / "train" / "hr_mask.npy").exists()
    bad = runner.invoke(app, [*common, "--tile-lr", "2", "--out", str(tmp_path / "no")])
    assert bad.exit_code != 0 and "--self-supervised" in bad.output


def test_sub_spot_map_of_the_real_spots(self_run, visium_like, tmp_path):
    """The trained model applied to the real spots as LR (bins of one pitch) gives maps at pitch / s."""
    from diffst.core.geometry import sub_spot_geometry
    from diffst.inference.predict import predict_checkpoint

    geom = sub_spot_geometry(spot_pitch_geometry(visium_like, scale=2))
    assert geom.lr_bin_um == pytest.approx(100.0) and geom.hr_bin_um == pytest.approx(50.0)
    with pytest.raises(GeometryError, match="sub_spot_geometry"):
        prepare_dataset([visium_like], tmp_path / "x", spot_pitch_geometry(visium_like, 2), n_genes=6,
                        progress=False, preview=False, sub_spot=True)
    from diffst.runs import load_run

    genes = load_run(self_run).dataset.genes
    path = prepare_dataset([visium_like], tmp_path / "sub", geom, genes=genes, progress=False, preview=False,
                           split=SplitSpec(test_samples=[visium_like.name]), sub_spot=True)
    # One batch: the tiny model's group norms cannot take a single 2 x 2 tile alone (a 1 x 1 condition grid).
    tiles, preds, _ = predict_checkpoint(self_run, path, split="test", device="cpu", progress=False, batch_size=64)
    mean = np.asarray(preds.mean, np.float64)
    assert mean.shape == (len(tiles), len(genes), 2, 2) and np.isfinite(mean).all()
    lr, lr_mask = np.asarray(tiles.lr_counts, np.float64), np.asarray(tiles.lr_mask, bool)
    # LR bins are the spots themselves: one spot's counts, or the mean of two centres in one bin.
    cols = visium_like.gene_indices(genes)
    xy, counts = visium_like.spots.xy_um, visium_like.spots.counts[:, cols].toarray()
    for t, row in tiles.tiles.iterrows():
        inside = ((xy[:, 0] >= row.x0_um) & (xy[:, 0] < row.x1_um) & (xy[:, 1] >= row.y0_um) & (xy[:, 1] < row.y1_um))
        assert lr_mask[t, 0, 0] == inside.any()
        if inside.any():
            np.testing.assert_allclose(lr[t, :, 0, 0], counts[inside].mean(axis=0), rtol=1e-5)
    sums = block_sum(mean, 2)
    measured = np.broadcast_to(lr_mask[:, None], sums.shape)
    np.testing.assert_allclose(sums[measured], lr[measured], rtol=1e-3, atol=1e-3)


def test_whole_slide_of_a_self_supervised_run_is_the_sub_spot_map(self_run, visium_like):
    """``predict --input`` with a run that learnt from spots tiles the real spots as LR, one scale finer."""
    from diffst.core.geometry import sub_spot_geometry
    from diffst.inference.whole_slide import whole_slide_tiles
    from diffst.runs import load_run

    run = load_run(self_run)
    assert run.dataset.self_supervised  # recorded in the checkpoint's dataset spec
    expected = sub_spot_geometry(run.dataset.geometry)
    with whole_slide_tiles([visium_like], run, progress=False) as path:
        tiles = PreparedTiles(path, "test")
        assert tiles.geometry.hr_bin_um == pytest.approx(expected.hr_bin_um)
        assert tiles.geometry.lr_bin_um == pytest.approx(run.dataset.geometry.hr_bin_um)  # LR = the spots
        assert json.loads((path / "dataset.json").read_text())["sub_spot"]
        assert len(tiles) > 0 and np.asarray(tiles.lr_mask).any()
