"""The main job end to end on the built-in example, shortened: both stages, prediction, baselines, outputs."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
from typer.testing import CliRunner

from diffst.cli import app


def test_demo_trains_both_stages_and_reports_the_baselines(tmp_path, one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "2", "--samples", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for row in ("bicubic", "best baseline (", "Diff-ST", "noise ceiling"):
        assert row in result.output, row
    assert (out / "run_s10-regression").is_dir() and (out / "run_s10").is_dir()
    metrics = json.loads((out / "metrics_s10.json").read_text())
    for method in ("bicubic", "ridge", "ridge+spots", "tesla+spots", "diffst"):
        assert np.isfinite(metrics[method]["pcc"]) and np.isfinite(metrics[method]["rmse_counts"]), method
    assert metrics["setup"]["sampler"]["point_estimate"] == "base" and metrics["setup"]["sampler"]["spot_consistent"]
    adata = ad.read_h5ad(out / "prediction_s10.h5ad")
    assert np.isfinite(adata.X).all() and (adata.layers["std"] >= 0).all()
    assert (out / "comparison_s10.png").stat().st_size > 0 and (out / "slide_s10.png").stat().st_size > 0
