"""Predictions open in the scverse tools: squidpy / scanpy over the histology (.h5ad), SpatialData (.zarr).

The plots need the optional ``spatial`` extra (squidpy, spatialdata, spatialdata-plot); those tests skip
without it. Provenance and the image placement are checked without it.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from diffst.cli import app
from diffst.data.dataset import PreparedTiles
from diffst.inference.histology import HistologyMosaic, hires_image, mosaic_tiles

runner = CliRunner()


def _predict(run, data, out, *extra):
    args = ["predict", "--checkpoint", str(run), "--data", str(data), "--out", str(out), "--samples", "2",
            "--device", "cpu", "--seed", "3", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def h5ad_prediction(tiny_xenium_run, prepared_xenium, tmp_path_factory):
    out = tmp_path_factory.mktemp("h5ad") / "pred.h5ad"
    _predict(tiny_xenium_run, prepared_xenium, out)
    return out


@pytest.fixture(scope="module")
def zarr_prediction(tiny_xenium_run, prepared_xenium, tmp_path_factory):
    pytest.importorskip("spatialdata")
    out = tmp_path_factory.mktemp("zarr") / "result.zarr"
    _predict(tiny_xenium_run, prepared_xenium, out)
    return out


# ---- the histology image and its placement (no optional package needed) ---------------------------------


def test_mosaic_averages_overlapping_tiles():
    tiles = np.zeros((2, 1, 4, 4), np.uint8)
    tiles[0], tiles[1] = 100, 200
    mosaic = mosaic_tiles(tiles, np.array([10.0, 12.0]), np.array([0.0, 0.0]), tile_um=4.0)
    assert mosaic.image.shape == (4, 6, 1) and mosaic.um_per_px == 1.0 and (mosaic.x0_um, mosaic.y0_um) == (10, 0)
    np.testing.assert_array_equal(mosaic.image[0, :, 0], [100, 100, 150, 150, 200, 200])
    assert mosaic.covered.all()


def test_lazy_mosaic_is_the_mosaic_block_by_block():
    pytest.importorskip("dask")
    from diffst.io.spatialdata_out import lazy_mosaic

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (7, 3, 8, 8), dtype=np.uint8)  # RGB, overlapping, with a gap
    x0 = np.array([0.0, 4.0, 8.0, 0.0, 4.0, 20.0, 24.0])
    y0 = np.array([0.0, 0.0, 0.0, 6.0, 6.0, 2.0, 2.0])
    order = np.array([6, 5, 4, 3, 2, 1, 0])  # the split's rows of the sample's tiles, in the sample's order
    reference = mosaic_tiles(tiles[order], x0, y0, tile_um=8.0)
    # Blocks of 5 px cut through tiles, so a pixel's tiles are summed across block edges.
    image, gx0, gy0, um_per_px = lazy_mosaic(tiles, order, x0, y0, tile_um=8.0, block=5)
    assert image.chunks[1][0] == 5 and (gx0, gy0, um_per_px) == (0.0, 0.0, 1.0)
    np.testing.assert_array_equal(image.compute(), np.moveaxis(reference.image, -1, 0))
    assert (reference.image[~reference.covered] == 255).all()  # white glass between tiles


def test_bin_labels_number_covered_bins_in_row_order():
    from diffst.inference.output import SamplePlan
    from diffst.io.spatialdata_out import bin_labels

    plan = SamplePlan("s", None, np.arange(2), np.array([0, 3]), np.array([0, 1]), 0.0, 0.0, {})
    labels = bin_labels(plan, tile_hr=2)
    np.testing.assert_array_equal(labels, [[1, 2, 0], [3, 4, 0], [0, 0, 0], [0, 5, 6], [0, 7, 8]])


@pytest.mark.parametrize("rotated", [False, True])
def test_hires_image_puts_the_histology_under_the_bins(rotated):
    # A dark mosaic with one bright 10 x 10 µm square at x 130-140, y 60-70 µm.
    image = np.zeros((100, 100, 1), np.uint8)
    image[40:50, 30:40] = 255
    mosaic = HistologyMosaic(image, 100.0, 20.0, 1.0, np.ones((100, 100), bool))
    px_um = 0.25  # full-resolution image: 0.25 µm/px, corner at (50, 0) µm, optionally turned by 90 degrees
    um_to_px = np.array([[1 / px_um, 0, -50 / px_um], [0, 1 / px_um, 0], [0, 0, 1]])
    if rotated:  # x_px = y_um / px, y_px = (400 - x_um) / px
        um_to_px = np.array([[0, 1 / px_um, 0], [-1 / px_um, 0, 400 / px_um], [0, 0, 1]])
    hires, scalef = hires_image(mosaic, um_to_px, max_side=300)
    assert hires.dtype == np.uint8 and hires.shape[2] == 3 and max(hires.shape[:2]) <= 300
    # What scanpy does with a bin at obsm['spatial'] (full-resolution px): look at spatial * scalef in hires.
    centre_px = um_to_px @ np.array([135.0, 65.0, 1.0])
    col, row = (centre_px[:2] * scalef).astype(int)
    assert hires[row, col].min() == 255
    outside_px = um_to_px @ np.array([135.0, 80.0, 1.0])
    col, row = (outside_px[:2] * scalef).astype(int)
    assert hires[row, col].max() == 0


# ---- .h5ad: squidpy / scanpy over the histology --------------------------------------------------------


def test_h5ad_carries_the_histology_for_squidpy(h5ad_prediction, prepared_xenium, tmp_path):
    import anndata as ad

    adata = ad.read_h5ad(h5ad_prediction)
    (library,) = adata.uns["spatial"]
    spatial = adata.uns["spatial"][library]
    hires, factors = spatial["images"]["hires"], spatial["scalefactors"]
    meta = json.loads((prepared_xenium / "dataset.json").read_text())
    px_um = meta["samples"][0]["pixel_size_um"]
    # 3 test tiles of 200 µm stacked over the held-out strip, tile images at 128 px per 200 µm: the hires image
    # covers full-resolution pixels from (0, 0) to the strip's far corner at 1.5625 µm per hires pixel.
    mosaic_um = meta["geometry"]["tile_lr"] * meta["geometry"]["scale"] * meta["geometry"]["hr_bin_um"] / 128
    assert factors["tissue_hires_scalef"] == pytest.approx(px_um / mosaic_um)
    x1_um, y1_um = adata.obs["x_um"].max() + 5, adata.obs["y_um"].max() + 5
    expected = (np.ceil((y1_um - 212) / px_um * factors["tissue_hires_scalef"]),
                np.ceil((x1_um - 1062) / px_um * factors["tissue_hires_scalef"]), 3)
    assert hires.shape == expected and hires.dtype == np.uint8
    assert factors["spot_diameter_fullres"] == pytest.approx(10.0 / px_um)
    # Every bin sits on imaged tissue: the hires pixel under each bin is inside the image and not all blank.
    rc = np.floor(adata.obsm["spatial"] * factors["tissue_hires_scalef"]).astype(int)
    assert (rc >= 0).all() and (rc[:, 1] < hires.shape[0]).all() and (rc[:, 0] < hires.shape[1]).all()
    assert hires[rc[:, 1], rc[:, 0]].mean() > 5

    sq = pytest.importorskip("squidpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gene = adata.var_names[0]
    sq.pl.spatial_scatter(adata, color=gene, img=True, shape="square")
    plt.savefig(tmp_path / "squidpy.png", dpi=60)
    plt.close("all")
    assert (tmp_path / "squidpy.png").stat().st_size > 5_000
    sc = pytest.importorskip("scanpy")
    sc.pl.spatial(adata, color=gene, show=False)
    plt.savefig(tmp_path / "scanpy.png", dpi=60)
    plt.close("all")
    assert (tmp_path / "scanpy.png").stat().st_size > 5_000


def test_provenance_records_checkpoint_sampler_and_hashed_inputs(h5ad_prediction, tiny_xenium_run, prepared_xenium):
    import anndata as ad
    import torch

    import diffst

    info = ad.read_h5ad(h5ad_prediction).uns["diffst"]
    assert info["checkpoint"].startswith(str(tiny_xenium_run)) and info["step"] == 4 and info["weights"] == "ema"
    assert info["seed"] == 3 and info["num_samples"] == 2
    assert (info["sampler"]["method"], info["sampler"]["steps"], info["sampler"]["num_samples"]) == ("ddim", 2, 2)
    assert info["diffst_version"] == diffst.__version__ and info["torch_version"] == torch.__version__
    files = info["input"]["files"]
    assert info["input"]["dataset"] == str(prepared_xenium.resolve()) and info["input"]["split"] == "test"
    names = [p.split("/")[-1] for p in files["path"]]
    assert {"dataset.json", "tiles.csv", "lr_counts.npy", "tissue.npy", "hr_counts.npy"} <= set(names)
    for path, size, digest in zip(files["path"], files["size_bytes"], files["sha256"], strict=True):
        data = open(path, "rb").read()
        assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    # The raw transcripts named by dataset.json, and the checkpoint's files with their manifest hashes.
    assert any(p.endswith(("transcripts.parquet", "transcripts.csv.gz")) for p in info["input"]["source_files"]["path"])
    ckpt = info["checkpoint_files"]
    assert any(p.endswith("ema.safetensors") for p in ckpt["path"]) and all(len(h) == 64 for h in ckpt["sha256"])


# ---- .zarr: SpatialData -------------------------------------------------------------------------------


def test_zarr_store_reads_back_with_elements_in_microns(zarr_prediction, prepared_xenium, h5ad_prediction):
    import anndata as ad
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    sdata = sd.read_zarr(zarr_prediction)
    meta = json.loads((prepared_xenium / "dataset.json").read_text())
    name = meta["samples"][0]["name"]
    assert set(sdata.images) == {f"{name}_histology"}
    assert set(sdata.labels) == {f"{name}_hr_bins"}
    assert set(sdata.shapes) == {f"{name}_lr_spots"}
    assert set(sdata.tables) == {"table", "lr_spots"}

    # Image pixel (0, 0) lands on the mosaic's corner (the first test tile), 1.5625 µm per pixel; its pixels
    # are those of the in-memory mosaic.
    image = sdata.images[f"{name}_histology"]
    assert image.dtype == np.uint8 and image.dims == ("c", "y", "x") and image.shape[0] == meta["image_channels"]
    to_um = get_transformation(image, to_coordinate_system="global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(to_um, [[1.5625, 0, 1372.0], [0, 1.5625, 212.0], [0, 0, 1]])
    dataset = PreparedTiles(prepared_xenium, "test")
    mosaic = mosaic_tiles(dataset.tissue, dataset.tiles["x0_um"].to_numpy(), dataset.tiles["y0_um"].to_numpy(),
                          dataset.geometry.tile_um)
    np.testing.assert_array_equal(np.asarray(image), np.moveaxis(mosaic.image, -1, 0))

    # HR bins: a labels raster of 10 µm pixels in microns; label i is table row instance_id == i, at its centre.
    table, bins = sdata.tables["table"], sdata.labels[f"{name}_hr_bins"]
    reference = ad.read_h5ad(h5ad_prediction)
    assert table.shape == reference.shape and table.n_obs == int((np.asarray(bins) > 0).sum())
    np.testing.assert_allclose(table.X, reference.X, rtol=1e-6)
    assert list(table.obs_names) == list(reference.obs_names)
    assert {"std", "observed"} <= set(table.layers) and "spatial" in table.uns
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region_key"], attrs["instance_key"]) == ("region", "instance_id")
    assert set(table.obs["region"]) == {f"{name}_hr_bins"}
    bins_to_um = get_transformation(bins, to_coordinate_system="global").to_affine_matrix(("x", "y"), ("x", "y"))
    assert bins_to_um[0, 0] == bins_to_um[1, 1] == 10.0
    grid = np.asarray(bins)
    rows, cols = np.nonzero(grid)
    order = np.argsort(grid[rows, cols])
    centres = np.column_stack([cols[order] + 0.5, rows[order] + 0.5, np.ones(len(order))]) @ bins_to_um.T
    by_label = table.obs.set_index("instance_id").loc[np.sort(grid[rows, cols])]
    np.testing.assert_allclose(centres[:, 0], by_label["x_um"])
    np.testing.assert_allclose(centres[:, 1], by_label["y_um"])
    assert table.uns["diffst"]["step"] == 4 and len(table.uns["diffst"]["input"]["files"]["sha256"]) >= 5

    # LR spots: non-overlapping 50 µm squares whose counts are the sums of the observed HR bins inside them.
    spots, lr = sdata.shapes[f"{name}_lr_spots"], sdata.tables["lr_spots"]
    assert len(spots) == lr.n_obs > 0 and np.allclose(spots.area, 2500.0)
    assert spots.union_all().area == pytest.approx(spots.area.sum())
    observed = np.asarray(table.layers["observed"])
    for i in range(min(lr.n_obs, 5)):
        x0, y0 = lr.obs["x_um"].iloc[i] - 25, lr.obs["y_um"].iloc[i] - 25
        inside = ((table.obs["x_um"] > x0) & (table.obs["x_um"] < x0 + 50) & (table.obs["y_um"] > y0)
                  & (table.obs["y_um"] < y0 + 50)).to_numpy()
        assert inside.sum() == 25
        np.testing.assert_allclose(observed[inside].sum(axis=0), np.asarray(lr.X)[i], rtol=1e-5)


def test_spatialdata_plot_draws_a_gene_over_the_histology(zarr_prediction, tmp_path):
    import spatialdata as sd

    pytest.importorskip("spatialdata_plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sdata = sd.read_zarr(zarr_prediction)
    bins = next(k for k in sdata.labels if k.endswith("_hr_bins"))
    spots = next(k for k in sdata.shapes if k.endswith("_lr_spots"))
    gene = sdata.tables["table"].var_names[0]
    sdata.pl.render_images().pl.render_labels(bins, color=gene, table_name="table", fill_alpha=0.7).pl.show(
        save=tmp_path / "bins.png")
    sdata.pl.render_images().pl.render_shapes(spots, color=gene, table_name="lr_spots").pl.show(
        save=tmp_path / "spots.png")
    plt.close("all")
    assert (tmp_path / "bins.png").stat().st_size > 5_000 and (tmp_path / "spots.png").stat().st_size > 5_000


def test_zarr_output_is_replaced_only_when_ours(zarr_prediction, tiny_xenium_run, prepared_xenium, tmp_path):
    args = ["predict", "--checkpoint", str(tiny_xenium_run), "--data", str(prepared_xenium), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(zarr_prediction)])
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    mine = tmp_path / "mine.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = runner.invoke(app, [*args, "--out", str(mine), "--overwrite"])
    assert result.exit_code == 2 and "Refusing to replace" in result.output
    assert (mine / "notes.txt").read_text() == "keep"
    _predict(tiny_xenium_run, prepared_xenium, zarr_prediction, "--overwrite", "--no-evaluate")
    assert sorted(p.name for p in zarr_prediction.parent.iterdir()) == ["result.metrics.json", "result.zarr"]


def test_zarr_without_the_spatial_extra_says_how_to_install(tiny_xenium_run, prepared_xenium, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # import spatialdata now raises ImportError
    out = tmp_path / "result.zarr"
    result = runner.invoke(app, ["predict", "--checkpoint", str(tiny_xenium_run), "--data", str(prepared_xenium),
                                 "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2
    assert "pip install 'diffst[spatial]'" in result.output and "spatialdata" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- whole slide from raw files (--input) ----------------------------------------------------------------


def test_tile_window_blends_half_shifted_tiles_evenly():
    from diffst.inference.whole_slide import tile_window

    w = tile_window(20)
    assert w.shape == (20, 20) and np.allclose(w, w.T) and w.min() > 0
    one_axis = np.sin(np.pi * (np.arange(20) + 0.5) / 20) ** 2
    np.testing.assert_allclose(one_axis[10:] + one_axis[:10], 1.0)  # a partition of unity at half-tile stride


def test_whole_slide_blending_hides_tile_edges(tiny_xenium_run, xenium_crop):
    from diffst.inference.predict import predict_checkpoint, to_anndata
    from diffst.inference.whole_slide import whole_slide_tiles
    from diffst.io import read_xenium
    from diffst.runs import load_run

    sample = read_xenium(xenium_crop.folder, image_origin_um=xenium_crop.origin_um, **xenium_crop.read_kw)
    run = load_run(tiny_xenium_run)
    with whole_slide_tiles([sample], run, progress=False) as data:
        dataset, preds, _ = predict_checkpoint(tiny_xenium_run, data, sampler={"num_samples": 2}, device="cpu",
                                               progress=False, run=run)
        window = to_anndata(dataset, preds, blend="window")
        mean = to_anndata(dataset, preds, blend="mean")
    (seams,) = window.uns["diffst"]["seams"].values()
    # The whole 510 x 382 µm crop is covered (tiles of 200 µm at a 100 µm stride).
    assert len(dataset) >= 12 and window.n_obs > 0.9 * 51 * 38
    assert seams["n_seam_pairs"] > 100 and seams["n_inside_pairs"] > 1000
    # No visible edges: neighbouring bins differ across tile edges no more than inside tiles.
    assert 0 < seams["ratio"] < 1.1
    np.testing.assert_allclose(mean.obsm["spatial_um"], window.obsm["spatial_um"])


def test_window_blend_removes_the_steps_that_averaging_leaves():
    import pandas as pd

    from diffst.inference.predict import stitch
    from diffst.inference.whole_slide import seam_jump, tile_window

    # 2 x 5 tiles of 20 bins at a 10-bin stride, each tile a smooth ramp plus its own offset (a tile-wise bias).
    rng = np.random.default_rng(0)
    tiles = pd.DataFrame([(c * 100.0, r * 100.0) for r in range(2) for c in range(5)], columns=["x0_um", "y0_um"])
    ramp = np.add.outer(np.arange(20), np.arange(20)) * 0.05
    maps = ramp[None, None] + rng.normal(0, 1, (len(tiles), 1, 1, 1))  # (tiles, genes = 1, 20, 20)
    jumps = {}
    for name, window in (("mean", None), ("window", tile_window(20))):
        table = stitch(tiles, {"mean": maps}, 10.0, window)
        jumps[name] = seam_jump(table, table.attrs["maps"]["mean"], tiles, 10.0, 20)
    assert jumps["mean"]["ratio"] > 3 * jumps["window"]["ratio"]
    assert jumps["window"]["seam_mean_abs_diff"] < 0.5 * jumps["mean"]["seam_mean_abs_diff"]


def test_predict_cli_from_raw_input(tiny_xenium_run, xenium_crop, tmp_path):
    import anndata as ad

    out = tmp_path / "slide.h5ad"
    args = ["predict", "--checkpoint", str(tiny_xenium_run), "--input", str(xenium_crop.folder), "--image-origin",
            ",".join(f"{v:g}" for v in xenium_crop.origin_um), "--out", str(out), "--samples", "2", "--device", "cpu"]
    if "pixel_size_um" in xenium_crop.read_kw:
        args += ["--pixel-size", str(xenium_crop.read_kw["pixel_size_um"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "across tile edges" in result.output
    adata = ad.read_h5ad(out)
    info = adata.uns["diffst"]
    assert info["blend"] == "window" and info["input"]["kind"] == "raw"
    assert any(p.endswith("morphology_mip.tif") for p in info["input"]["files"]["path"])
    assert all(len(h) == 64 for h in info["input"]["files"]["sha256"])
    # Only the prediction is left: the temporary tiling beside it is gone, and no metrics for a whole slide.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.h5ad"]
    result = runner.invoke(app, ["predict", "--checkpoint", str(tiny_xenium_run), "--out", str(tmp_path / "x.h5ad")])
    assert result.exit_code == 2 and "either --data" in result.output


def test_h5ad_carries_ordered_count_intervals_and_says_how_they_were_made(h5ad_prediction):
    import anndata as ad

    adata = ad.read_h5ad(h5ad_prediction)
    q = {k: np.asarray(adata.layers[k]) for k in ("q05", "q25", "q75", "q95")}
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in q.values())
    assert (q["q05"] <= q["q25"]).all() and (q["q25"] <= q["q75"]).all() and (q["q75"] <= q["q95"]).all()
    assert (q["q95"] > q["q05"]).any()  # Poisson noise alone gives the counts room
    record = adata.uns["diffst"]["intervals"]
    assert list(record["levels"]) == [0.5, 0.9] and float(record["spread"]) == 1.0 and not record["calibrated"]


def test_slide_figure_from_the_prediction(h5ad_prediction, tmp_path):
    import anndata as ad

    from diffst.plotting.slide import region_maps

    adata = ad.read_h5ad(h5ad_prediction)
    sample = str(adata.obs["sample"].iloc[0])
    grid, origin = region_maps(adata, sample)
    assert grid.shape[0] == adata.n_vars and np.isfinite(grid).sum() == adata.n_obs * adata.n_vars
    # Every bin lands where its micron position says.
    bin_um = adata.uns["diffst"]["geometry"]["hr_bin_um"]
    first = adata.obs.iloc[0]
    assert np.isclose(origin[0] + (first["col"] + 0.5) * bin_um, first["x_um"])
    out = tmp_path / "slide.png"
    gene = str(adata.var_names[1])
    result = runner.invoke(app, ["plot", str(h5ad_prediction), "--out", str(out), "--genes", gene])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000
    bad = runner.invoke(app, ["plot", str(h5ad_prediction), "--out", str(out), "--genes", "NOT_A_GENE"])
    assert bad.exit_code != 0 and "NOT_A_GENE" in bad.output
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    refused = runner.invoke(app, ["plot", str(h5ad_prediction), "--out", str(mine)])
    assert refused.exit_code != 0 and mine.read_text() == "keep me"
