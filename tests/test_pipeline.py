"""End to end through the command line: prepare, train a tiny model, predict AnnData, evaluate."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from diffst.cli import app
from diffst.inference.predict import stitch

runner = CliRunner()


@pytest.mark.parametrize("scale", [5, 10])
def test_prepare_cli_on_example(tmp_path, scale):
    out = tmp_path / f"p{scale}"
    result = runner.invoke(app, ["prepare", "--example", "--scale", str(scale), "--n-genes", "6", "--train-stride", "100",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["geometry"]["scale"] == scale and meta["n_tiles"]["test"] == 3
    assert (out / "preview.png").exists()
    again = runner.invoke(app, ["prepare", "--example", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_prepare_cli_reports_bad_input(tmp_path):
    result = runner.invoke(app, ["prepare", "--example", "--genes", "ERBB2,NOPE", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "NOPE" in result.output
    result = runner.invoke(app, ["prepare", "--example", "--test-region", "1,2,3", "--out", str(tmp_path / "y")])
    assert result.exit_code != 0 and "4 comma-separated numbers" in result.output


def test_stitch_averages_overlaps():
    tiles = pd.DataFrame({"x0_um": [0.0, 20.0], "y0_um": [0.0, 0.0]})
    a = np.ones((2, 1, 4, 4))
    a[1] *= 3
    table = stitch(tiles, {"mean": a, "std": a}, hr_bin_um=10.0)
    assert len(table) == 4 * 6  # 4 rows x (4 + 2) cols
    values = table.attrs["maps"]["mean"][:, 0]
    overlap = table["col"].isin([2, 3]).to_numpy()
    np.testing.assert_allclose(values[overlap], 2.0)
    np.testing.assert_allclose(table.attrs["maps"]["std"][overlap, 0], np.sqrt(5.0))
    np.testing.assert_allclose(table.loc[table["col"] == 0, "x_um"], 5.0)


def test_train_predict_anndata(prepared_xenium, xenium_sample, tmp_path):
    import anndata as ad
    import yaml

    config = {
        "preset": "tiny",
        "data": {"path": str(prepared_xenium)},
        "train": {"steps": 6, "log_every": 1, "checkpoint_every": 3},
        "sampler": {"method": "ddim", "steps": 3},
        "seed": 1, "run_dir": str(tmp_path / "run"),
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred.h5ad"
    args = ["predict", "--checkpoint", str(tmp_path / "run"), "--data", str(prepared_xenium), "--out", str(out),
            "--sampler", "ddim", "--steps", "3", "--samples", "2", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(out)
    meta = json.loads((prepared_xenium / "dataset.json").read_text())
    assert list(adata.var_names) == meta["genes"]
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    # 3 overlapping 20 x 20 test tiles stacked vertically over the held-out strip
    assert adata.n_obs == len(np.unique(adata.obs[["row", "col"]].to_numpy(), axis=0)) > 400
    assert adata.X.min() >= 0 and np.isfinite(adata.X).all()
    assert adata.layers["std"].max() > 0 and adata.layers["observed"].sum() > 0
    # spatial = microns mapped through the image placement (from the crop corner, at the image's pixel size:
    # Xenium's 0.2125 µm/px for the shared crop, 0.425 µm/px for the packaged one)
    px = xenium_sample.image.pixel_size_um
    np.testing.assert_allclose(adata.obsm["spatial"][:, 0], (adata.obs["x_um"] - 1062.0) / px, rtol=1e-6)
    report = json.loads(out.with_suffix(".metrics.json").read_text())
    assert {"bicubic", "diffst"} <= set(report) and -1 <= report["diffst"]["pcc"] <= 1
    # Same seed -> same prediction; without --sampler / --steps the run's own sampler settings (ddim, 3) are used.
    result = runner.invoke(app, args[:5] + ["--out", str(tmp_path / "again.h5ad"), "--samples", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    again = ad.read_h5ad(tmp_path / "again.h5ad")
    assert (again.uns["diffst"]["sampler"]["method"], again.uns["diffst"]["sampler"]["steps"]) == ("ddim", 3)
    np.testing.assert_allclose(again.X, adata.X, rtol=1e-5)
