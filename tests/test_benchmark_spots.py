"""``diffst benchmark`` on spot-only slides: the self-supervised mode, a sample split, scoring on measured spots.

Real data: the HER2ST sections C2 and C3 (legacy ST, H&E) when ``../shared`` is present (the protocol of the
README: LR = 2 x 2 spots, HR = the spots, train on C2, test on C3); the parts that need no HER2ST run on
the built-in Xenium crop as Visium-like spots.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import HER2ST_DIR
from diffst.baselines.ridge import HistologyRidge
from diffst.benchmark.folds import sample_fold
from diffst.cli import app
from diffst.errors import InputError
from diffst.evaluation.metrics import region_metrics
from diffst.evaluation.report import scoring_mask

runner = CliRunner()
needs_her2st = pytest.mark.skipif(not (HER2ST_DIR / "C3").is_dir(),
                                  reason=f"shared HER2ST data not found at {HER2ST_DIR} (../shared/data)")


def _sample(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name)  # sample_fold reads names only


def test_sample_fold_names_train_and_test_samples():
    fold = sample_fold([_sample("C2"), _sample("C3"), _sample("C4")], ["C3"])
    assert fold.name == "C2+C4_to_C3" and fold.test_samples == ("C3",) and fold.region is None
    with pytest.raises(InputError, match="names no sample"):
        sample_fold([_sample("C2"), _sample("C3")], ["D1"])
    with pytest.raises(InputError, match="at least one training"):
        sample_fold([_sample("C2"), _sample("C3")], ["C2", "C3"])


class _Split:
    """The parts of a prepared split that :func:`scoring_mask` reads."""

    def __init__(self, lr_mask, hr_mask, scale):
        self.lr_mask, self.hr_mask = lr_mask, hr_mask
        self.geometry = type("G", (), {"scale": scale})()


def test_scoring_mask_keeps_measured_spots_of_measured_blocks():
    lr_mask = np.array([[[True, False], [True, True]]])
    hr_mask = np.ones((1, 4, 4), bool)
    hr_mask[0, 3, 3] = False
    mask = scoring_mask(_Split(lr_mask, hr_mask, 2))
    expected = np.ones((1, 4, 4), bool)
    expected[0, :2, 2:] = False  # the unmeasured block
    expected[0, 3, 3] = False  # the bin without a spot
    np.testing.assert_array_equal(mask, expected)
    assert scoring_mask(_Split(np.ones((1, 2, 2), bool), np.ones((1, 4, 4), bool), 2)) is None


def test_region_metrics_leave_masked_bins_out():
    rng = np.random.default_rng(0)
    truth = rng.poisson(3.0, (2, 3, 4, 4)).astype(float)
    pred = truth.copy()
    mask = np.ones((2, 4, 4), bool)
    mask[:, 0, :] = False
    pred[:, :, 0, :] += 100.0  # wrong only where nothing is scored
    origins = np.array([[0.0, 0.0], [40.0, 0.0]])
    masked = region_metrics(pred, truth, origins, 10.0, mask)
    assert masked["region_rmse_counts"] == pytest.approx(0.0) and masked["region_pcc"] == pytest.approx(1.0)
    assert region_metrics(pred, truth, origins, 10.0)["region_rmse_counts"] > 10


def test_ridge_fit_ignores_masked_bins():
    rng = np.random.default_rng(1)
    lr = rng.poisson(20.0, (6, 2, 2, 2)).astype(float)
    tissue = rng.random((6, 1, 16, 16))
    hr = rng.poisson(5.0, (6, 2, 4, 4)).astype(float)
    mask = np.ones((6, 4, 4), bool)
    mask[:, :, 0] = False
    corrupted = hr.copy()
    corrupted[:, :, :, 0] = 0.0  # unmeasured bins hold zeros, as spot-only tiles do
    a = HistologyRidge().fit(lr, tissue, hr, 2, mask=mask)
    b = HistologyRidge().fit(lr, tissue, corrupted, 2, mask=mask)
    c = HistologyRidge().fit(lr, tissue, corrupted, 2)
    np.testing.assert_allclose(a.coef, b.coef)
    assert not np.allclose(a.coef, c.coef)


@needs_her2st
def test_her2st_sample_split_benchmark(tmp_path):
    """C2 -> C3 in the self-supervised mode through the CLI: one fold, scored on measured spots, resumable."""
    out = tmp_path / "bench"
    args = ["benchmark", str(HER2ST_DIR / "C2"), str(HER2ST_DIR / "C3"), "--self-supervised", "--test-sample", "C3",
            "--scales", "2", "--methods", "bicubic,ridge+spots,regression", "--n-genes", "6", "--budget", "tiny",
            "--device", "cpu", "--out", str(out)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = runner.invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["setup"]["test_samples"] == ["C3"] and saved["setup"]["self_supervised"]
    assert [f["fold"] for f in saved["folds"]] == ["C2_to_C3"]
    meta = json.loads((out / "prepared" / "s2" / "C2_to_C3" / "dataset.json").read_text())
    assert meta["self_supervised"] and meta["split"]["test_samples"] == ["C3"]
    assert meta["n_tiles"]["train"] > 0 and meta["n_tiles"]["test"] > 0
    cells = {c["method"]: c for c in saved["cells"]}
    assert set(cells) == {"bicubic", "ridge+spots", "regression"}
    for cell in cells.values():
        m = cell["metrics"]
        assert 0 < m["scored_fraction"] < 1  # bins without a spot or under an unmeasured block are left out
        assert np.isfinite([m["pcc"], m["rmse_counts"], m["region_pcc"]]).all()
    assert len(saved["setup"]["genes"]) == 6
    assert "sample split: train on C2, test on C3" in (out / "benchmark.md").read_text()
    # a rerun reuses every cell
    stamp = (out / "cells" / "s2" / "C2_to_C3" / "regression.json").stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (out / "cells" / "s2" / "C2_to_C3" / "regression.json").stat().st_mtime_ns == stamp


def test_cli_rejects_unknown_test_sample(tmp_path):
    result = runner.invoke(app, ["benchmark", "--example", "--test-sample", "C9", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "C9" in result.output and "names no sample" in result.output


def test_cli_tile_lr_needs_the_self_supervised_mode(tmp_path):
    result = runner.invoke(app, ["benchmark", "--example", "--tile-lr", "4", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "--tile-lr" in result.output and "--self-supervised" in result.output
    assert not (tmp_path / "b").exists()  # refused before any work
