"""``diffst benchmark``: region folds, a tiny cross-validated run on the built-in example, resume, CLI checks."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffst.benchmark.folds import grid_regions, grow_to_tile
from diffst.cli import app

runner = CliRunner()
METHODS = ("bicubic", "ridge", "regression", "regression-one-seed", "diffst")
MEMBERS = 2  # stage one's seed ensemble, kept small here


def _area(r):
    return max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)


def _overlap(a, b):
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


@pytest.mark.parametrize(("extent", "k", "layout"), [
    ((1062.0, 212.0, 1572.0, 594.5), 4, "auto"),
    ((1062.0, 212.0, 1572.0, 594.5), 4, "strips"),
    ((0.0, 0.0, 2000.0, 1000.0), 5, "auto"),
    ((0.0, 0.0, 1000.0, 1000.0), 6, "grid"),
])
def test_folds_cover_the_extent_and_are_disjoint(extent, k, layout):
    cells = grid_regions(extent, k, 200.0, layout)
    assert len(cells) == k
    for c in cells:
        assert extent[0] <= c[0] < c[2] <= extent[2] and extent[1] <= c[1] < c[3] <= extent[3]
    assert math.isclose(sum(_area(c) for c in cells), _area(extent))
    assert all(_overlap(a, b) == 0 for a, b in itertools.combinations(cells, 2))
    for c in cells:  # the held-out region holds the cell and fits a tile, inside the extent
        r = grow_to_tile(c, extent, 200.0)
        assert r[0] <= c[0] and r[1] <= c[1] and r[2] >= c[2] and r[3] >= c[3]
        assert r[2] - r[0] >= 200.0 - 1e-9 and r[3] - r[1] >= 200.0 - 1e-9
        assert extent[0] <= r[0] and r[2] <= extent[2] and extent[1] <= r[1] and r[3] <= extent[3]


def test_auto_layout_prefers_strips_when_a_tile_fits():
    cells = grid_regions((0.0, 0.0, 1000.0, 400.0), 4, 200.0)
    assert all(c[1] == 0.0 and c[3] == 400.0 for c in cells)  # vertical strips


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    from diffst.benchmark import run_benchmark
    from diffst.example import load_example

    out = tmp_path_factory.mktemp("bench") / "out"
    sample = load_example()
    # One torch thread: OpenMP's busy-waiting makes 2 threads on a shared 2-core machine 20-50x slower
    # (cli.main sets OMP_WAIT_POLICY=PASSIVE for that; under pytest torch is already loaded).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_benchmark([sample], out, scales=(10,), k=4, methods=METHODS, budget="tiny", device="cpu",
                               progress=False, members=MEMBERS)
    finally:
        torch.set_num_threads(threads)
    return sample, out, result


def test_tiny_benchmark_writes_finite_metrics_and_intervals(tiny_benchmark):
    _, out, result = tiny_benchmark
    for name in ("benchmark.json", "benchmark.md", "figures/metrics_s10.png", "figures/per_gene_pcc_s10.png",
                 "figures/examples_s10.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["setup"]["methods"] == list(METHODS)
    ok = [f for f in saved["folds"] if f["status"] == "ok"]
    assert len(saved["folds"]) == 4 and ok
    assert len(saved["cells"]) == len(ok) * len(METHODS)
    entry = saved["summary"]["s10"]
    for method in METHODS:
        row = entry["methods"][method]
        for key in ("pcc", "pcc_pooled", "region_pcc", "rmse_counts", "region_rmse_counts", "mae_counts", "ssim",
                    "paper_abs_pcc", "paper_rmse"):
            assert math.isfinite(row[key]), (method, key)
        lo, hi = row["pcc_ci"]
        assert lo <= row["pcc"] <= hi or math.isclose(lo, hi)
        assert math.isfinite(row["gap_closed"])
    assert entry["methods"]["bicubic"]["gap_closed"] == 0.0
    assert entry["methods"]["bicubic"]["pcc_vs_bicubic"] == 0.0
    ridge = entry["methods"]["ridge"]  # paired difference = difference of the means over the same tiles
    assert math.isclose(ridge["pcc_vs_bicubic"], ridge["pcc"] - entry["methods"]["bicubic"]["pcc"], abs_tol=1e-9)
    lo, hi = ridge["pcc_vs_bicubic_ci"]
    assert lo <= ridge["pcc_vs_bicubic"] <= hi
    assert 0 < entry["ceiling"]["pcc"] <= 1 and "n_genes_skipped" in entry["ceiling"]
    table = (out / "benchmark.md").read_text()
    assert "Table 1" in table and "Table 2" in table and "| s10 | ridge |" in table
    # Every fold's test tiles lie inside its held-out region, and methods are scored on the same tiles.
    for fold in ok:
        cells = [c for c in saved["cells"] if c["fold"] == fold["fold"]]
        assert len({tuple(c["tile_ids"]) for c in cells}) == 1
        assert all("example" not in c for c in cells)  # example maps stay in the cell files
    # Intervals: every sampling method's cells report coverage, and the cross-fitted calibration covers them.
    sampled = {c["method"] for c in saved["cells"] if c.get("coverage")}
    assert sampled == {"diffst"}  # ridge and bicubic draw no samples
    for method in sampled:
        row = saved["calibration"]["s10"][method]
        for key in ("raw_50", "raw_90", "calibrated_50", "calibrated_90"):
            assert 0.0 <= row[key] <= 1.0
        assert row["raw_50"] <= row["raw_90"] and len(row["spread"]) == len(ok)
    assert (out / "figures" / "calibration.png").stat().st_size > 0 and "Intervals: coverage" in table


@pytest.mark.parametrize("budget", ["tiny", "full"])
def test_benchmark_stage_one_is_the_recipes(tmp_path, budget):
    # The benchmark trains a two-stage method's stage one as its regression twin; that must be the run the
    # recipe (diffst train --two-stage) would train, member by member.
    from diffst.benchmark.methods import TWO_STAGE, run_config_dict, stage_one_method, stage_one_steps
    from diffst.config import parse_config
    from diffst.training.recipe import stage_one_config

    for method in TWO_STAGE:
        for member in (0, 2):
            folder = tmp_path / f"{stage_one_method(method)}-{budget}-seed{3 + member}"
            recipe = stage_one_config(run_config_dict(method, tmp_path, tmp_path / "two", budget, 3, "cpu"),
                                      stage_one_steps(budget), member)
            recipe["run_dir"] = str(folder)
            twin = run_config_dict(stage_one_method(method), tmp_path, folder, budget, 3 + member, "cpu")
            assert parse_config(recipe).to_dict() == parse_config(twin).to_dict(), (method, member)


def test_stage_one_is_a_seed_ensemble_sharing_its_runs(tiny_benchmark):
    from diffst.benchmark.methods import member_run_dirs

    _, out, result = tiny_benchmark
    fold = next(f["fold"] for f in result["folds"] if f["status"] == "ok")
    runs = out / "runs" / "s10" / fold
    # diffst's stage one is regression's ensemble, regression-one-seed its first member: no other folders.
    assert sorted(p.name for p in runs.iterdir()) == ["diffst-tiny-seed0", "regression-tiny-seed0",
                                                     "regression-tiny-seed1"]
    assert member_run_dirs("diffst", runs / "diffst-tiny-seed0", "tiny", 0, MEMBERS) == [
        runs / "regression-tiny-seed0", runs / "regression-tiny-seed1"]
    cells = out / "cells" / "s10" / fold
    ensemble, single = (np.load(cells / f"{m}.npz")["counts"] for m in ("regression", "regression-one-seed"))
    assert not np.allclose(ensemble, single)
    np.testing.assert_allclose(np.load(cells / "diffst.npz")["counts"], ensemble, rtol=1e-5, atol=1e-5)
    assert json.loads((cells / "regression.json").read_text())["setup"]["members"] == MEMBERS
    assert "members" not in json.loads((cells / "bicubic.json").read_text())["setup"]
    # Diff-ST's answer against the strongest competitor, paired on the same tiles.
    versus = result["summary"]["s10"]["versus_best"]
    assert versus["method"] == "diffst" and versus["best_competitor"] in ("bicubic", "ridge")
    lo, hi = versus["pcc_diff_ci"]
    assert lo <= versus["pcc_diff"] <= hi
    assert set(versus["each"]) == {"bicubic", "ridge"} and versus["each"][versus["best_competitor"]]["pcc_diff"] == (
        versus["pcc_diff"])
    assert set(versus["ablations"]) == {"regression-one-seed"}  # the other Diff-ST variants, paired too
    assert "the competitor of highest PCC" in (out / "benchmark.md").read_text()


def test_region_metrics_count_each_bin_once():
    from diffst.evaluation.metrics import mosaic, region_metrics

    rng = np.random.default_rng(0)
    region = rng.poisson(2.0, size=(3, 30, 40)).astype(float)
    origins = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 100.0]])  # 10 µm bins: offsets of 10 and 20 bins
    tiles = np.stack([region[:, r : r + 20, c : c + 20] for c, r in ((0, 0), (10, 0), (20, 10))])
    stitched, covered = mosaic(tiles, origins, 10.0)
    assert stitched.shape == region.shape and covered.sum() == 20 * 30 + 20 * 20 - 10 * 10
    np.testing.assert_allclose(stitched[:, covered], region[:, covered])
    assert region_metrics(tiles, tiles, origins, 10.0) == {"region_pcc": 1.0, "region_rmse_counts": 0.0}
    # A tile counted twice where tiles overlap would weigh overlaps double; stitched, one error per bin.
    noisy = tiles + 1.0
    assert math.isclose(region_metrics(noisy, tiles, origins, 10.0)["region_rmse_counts"], 1.0)
    with pytest.raises(ValueError, match="bin grid"):
        mosaic(tiles, origins + [[0.0, 0.0], [5.0, 0.0], [0.0, 0.0]], 10.0)


def test_second_run_reuses_every_cell(tiny_benchmark, monkeypatch):
    import diffst.benchmark.run as bench_run
    from diffst.benchmark import run_benchmark
    from diffst.benchmark.store import clean_json

    sample, out, first = tiny_benchmark
    cells = sorted((out / "cells").rglob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in cells}

    def no_work(*args, **kwargs):
        raise AssertionError("a finished cell was computed again")

    monkeypatch.setattr(bench_run, "predict_method", no_work)
    monkeypatch.setattr("diffst.data.prepare.prepare_dataset", no_work)
    again = run_benchmark([sample], out, scales=(10,), k=4, methods=METHODS, budget="tiny", device="cpu",
                          progress=False, members=MEMBERS)
    assert {p: p.stat().st_mtime_ns for p in cells} == before
    assert clean_json(again["summary"]) == json.loads((out / "benchmark.json").read_text())["summary"]
    assert again["summary"]["s10"]["methods"]["diffst"]["pcc"] == pytest.approx(
        first["summary"]["s10"]["methods"]["diffst"]["pcc"])


@pytest.mark.parametrize(("args", "message"), [
    (["--folds", "1"], "--folds must be at least 2, got 1"),
    (["--methods", "bicubic,magic"], "Unknown method(s) ['magic']"),
    (["--budget", "huge"], "Unknown --budget 'huge'"),
    (["--scales", "7"], "7"),
    (["--scales", "ten"], "--scales needs comma-separated integers"),
    (["--fold-layout", "rings"], "Unknown --fold-layout 'rings'"),
    (["--members", "0"], "--members must be at least 1, got 0"),
])
def test_cli_rejects_bad_options_with_one_line(tmp_path, args, message):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", "--example", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert message in text, text
    assert not out.exists()


def test_benchmark_genes_are_the_most_counted_ones():
    """Without held-out regions the top-N genes are counted over every sample (they were alphabetical once)."""
    import numpy as np

    from diffst.data.prepare import select_genes
    from diffst.example import load_example

    sample = load_example()
    counts = np.bincount(sample.transcripts["gene"].to_numpy(), minlength=len(sample.genes))
    chosen = select_genes([sample], 5, None)
    assert chosen == [sample.genes[i] for i in np.argsort(-counts, kind="stable")[:5]]
    assert chosen != sorted(sample.genes)[:5]
