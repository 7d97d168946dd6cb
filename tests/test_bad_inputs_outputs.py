"""Outputs are never destroyed or half-written, numeric options are checked, and every user error of
`diffst prepare / predict / demo` is one readable line with a non-zero exit code."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffst.atomic import clean_leftovers
from diffst.cli import app
from diffst.core.geometry import tile_preset
from diffst.data.dataset import PreparedTiles
from diffst.data.normalise import LogScaleNormaliser
from diffst.data.prepare import SplitSpec, prepare_dataset
from diffst.errors import GeometryError, InputError
from diffst.inference.predict import TilePredictions, check_finite

runner = CliRunner()
PREPARE_FAST = ["prepare", "--example", "--n-genes", "4", "--train-stride", "100"]


def _run(args, cwd=None):
    """Invoke the CLI, optionally from another working directory."""
    if cwd is None:
        return runner.invoke(app, args)
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, args)
    finally:
        os.chdir(old)


def _one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, text


# ---- 1. overwrite only ever replaces a prepared dataset ------------------------------------------------


# Every case runs inside tmp_path (HOME and the working directory point there), so that even a regression
# can only ever delete test files. The filesystem root is checked without running prepare at all.
@pytest.mark.parametrize("target", [".", "..", "~"])
def test_overwrite_refuses_working_dir_home_and_parents(tmp_path, monkeypatch, target):
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_notes.txt").write_text("precious")
    (tmp_path / "other_notes.txt").write_text("precious")
    monkeypatch.setenv("HOME", str(work))
    result = _run(PREPARE_FAST + ["--out", target, "--overwrite"], cwd=work)
    _one_line_error(result, "Refusing to write the prepared dataset")
    assert (work / "my_notes.txt").read_text() == (tmp_path / "other_notes.txt").read_text() == "precious"


def test_filesystem_root_is_never_an_output(tmp_path):
    from diffst.atomic import check_replaceable, swap_into_place

    with pytest.raises(InputError, match="Refusing to write the prepared dataset to /"):
        check_replaceable("/", "prepared dataset", lambda p: True, overwrite=True)
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(InputError, match="Refusing to replace"):
        swap_into_place(new, Path("/"))


def test_overwrite_refuses_a_folder_that_is_not_a_prepared_dataset(tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "figure.png").write_bytes(b"not ours")
    _one_line_error(_run(PREPARE_FAST + ["--out", str(mine), "--overwrite"]), f"Refusing to replace {mine}",
                    "not a prepared dataset written by Diff-ST")
    assert (mine / "figure.png").read_bytes() == b"not ours"
    # A prepared dataset that the user added a file to is not replaced either.
    ok = tmp_path / "ok"
    assert _run(PREPARE_FAST + ["--out", str(ok)]).exit_code == 0
    (ok / "analysis.ipynb").write_text("{}")
    _one_line_error(_run(PREPARE_FAST + ["--out", str(ok), "--overwrite"]), "Refusing to replace")
    assert (ok / "analysis.ipynb").exists()


def test_out_that_is_a_file_or_under_a_file_is_refused_before_work(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("x,y\n")
    _one_line_error(_run(PREPARE_FAST + ["--out", str(f), "--overwrite"]), "Refusing to replace", "that file exists")
    assert f.read_text() == "x,y\n"
    _one_line_error(_run(PREPARE_FAST + ["--out", str(f / "sub" / "p")]), "is a file, not a folder")


def test_overwrite_replaces_a_prepared_dataset(tmp_path):
    out = tmp_path / "p"
    assert _run(PREPARE_FAST + ["--out", str(out)]).exit_code == 0
    result = _run(["prepare", "--example", "--n-genes", "5", "--train-stride", "100", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "dataset.json").read_text())["genes"]) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"], "no litter beside the output"


# ---- 3. kill -9 at any moment leaves the old or the new complete dataset, and no litter afterwards -----------


def _complete_genes(path: Path) -> int:
    """Number of genes of a complete prepared dataset (every split readable), else fail."""
    meta = json.loads((path / "dataset.json").read_text())
    for split in ("train", "test"):
        tiles = PreparedTiles(path, split)
        assert len(tiles) == meta["n_tiles"][split]
        assert np.asarray(tiles.hr_counts).shape[1] == len(meta["genes"])
    return len(meta["genes"])


def test_kill_during_prepare_overwrite_keeps_a_complete_dataset(tmp_path):
    out = tmp_path / "p"
    assert _run(PREPARE_FAST + ["--out", str(out)]).exit_code == 0
    cmd = [sys.executable, "-m", "diffst.cli", "prepare", "--example", "--n-genes", "5", "--train-stride", "100",
           "--out", str(out), "--overwrite"]
    for delay in (0.0, 0.3, 1.0):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not list(tmp_path.glob(".p.partial-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _complete_genes(out) in (4, 5)
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".p.*")), "the killed runs left their temporary folders"
    result = _run(["prepare", "--example", "--n-genes", "5", "--train-stride", "100", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert _complete_genes(out) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"], "the next run cleared the leftovers"


def test_interrupted_swap_is_restored_by_the_next_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "p"
    aside = tmp_path / f".p.old-{dead.pid}"
    aside.mkdir()
    (aside / "dataset.json").write_text("{}")
    stale = tmp_path / f".p.partial-{dead.pid}-0"
    stale.mkdir()
    unrelated = tmp_path / ".other.partial-1-0"
    unrelated.mkdir()
    clean_leftovers(target)
    assert (target / "dataset.json").exists() and not aside.exists() and not stale.exists()
    assert unrelated.exists(), "only leftovers of this output are touched"


# ---- 8. duplicated genes, held-out regions, strides ------------------------------------------------------


def test_duplicate_gene_is_an_error(tmp_path):
    _one_line_error(_run(["prepare", "--example", "--genes", "ERBB2,ERBB2", "--out", str(tmp_path / "p")]),
                    "names ['ERBB2'] more than once")


def test_test_region_covering_all_tissue_leaves_no_training_tiles(xenium_sample, tmp_path):
    with pytest.raises(InputError, match="No training tiles are left"):
        prepare_dataset([xenium_sample], tmp_path / "p", tile_preset("cpu", 10), n_genes=4, progress=False,
                        split=SplitSpec(test_region=(0, 0, 5000, 5000)))
    assert not (tmp_path / "p").exists()


def test_whole_sample_held_out_is_a_prediction_only_dataset(xenium_sample, tmp_path, caplog):
    path = prepare_dataset([xenium_sample], tmp_path / "p", tile_preset("cpu", 10), n_genes=4, progress=False,
                           split=SplitSpec(test_samples=[xenium_sample.name], eval_stride_um=100))
    meta = json.loads((path / "dataset.json").read_text())
    assert meta["n_tiles"]["train"] == 0 and meta["normaliser_fitted_on"] == "test"
    assert "prediction-only dataset" in caplog.text


@pytest.mark.parametrize("flag", ["--train-stride", "--eval-stride"])
def test_zero_or_negative_stride_is_an_error(tmp_path, flag):
    for value in ("0", "-20"):
        _one_line_error(_run(["prepare", "--example", flag, value, "--out", str(tmp_path / "p")]),
                        "greater than 0")


# ---- 9 / 13. region values in the user's terms -------------------------------------------------------------


@pytest.mark.parametrize("region", ["nan,212,1572,594", "1372,212,inf,594"])
def test_non_finite_region_is_an_error(tmp_path, region):
    _one_line_error(_run(["prepare", "--example", "--test-region", region, "--out", str(tmp_path / "p")]),
                    "4 comma-separated numbers (finite)")


def test_empty_region_is_an_error(tmp_path):
    _one_line_error(_run(["prepare", "--example", "--test-region", "1572,212,1372,594", "--out", str(tmp_path / "p")]),
                    "is empty: it needs x0 < x1 and y0 < y1")


def test_region_outside_the_tissue_says_so(xenium_sample, tmp_path):
    with pytest.raises(GeometryError, match=r"--test-region 5000,5000,5300,5300 lies outside the data of sample"):
        prepare_dataset([xenium_sample], tmp_path / "p", tile_preset("cpu", 10), n_genes=4, progress=False,
                        split=SplitSpec(test_region=(5000, 5000, 5300, 5300)))
    with pytest.raises(GeometryError, match="less than one 200 µm tile"):
        prepare_dataset([xenium_sample], tmp_path / "p", tile_preset("cpu", 10), n_genes=4, progress=False,
                        split=SplitSpec(test_region=(1372, 212, 1450, 594.5)))


# ---- 5 / 6 / 9 / 12. predict ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(prepared_xenium, tmp_path_factory):
    """A real 4-step training run of a tiny model on the prepared crop."""
    from diffst.config import parse_config
    from diffst.training import train

    run_dir = tmp_path_factory.mktemp("run") / "run"
    cfg = parse_config({
        "data": {"path": str(prepared_xenium), "batch_size": 2},
        "model": {"preset": "cpu", "base_channels": 16, "hr_size": 20, "attention_resolutions": [10]},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 4},
        "sampler": {"method": "ddim", "steps": 2},
        "seed": 1, "device": "cpu", "run_dir": str(run_dir),
    }, "test")
    return train(cfg)


def _predict_args(run, data, out, *extra):
    return ["predict", "--checkpoint", str(run), "--data", str(data), "--out", str(out), "--sampler", "ddim",
            "--steps", "2", "--device", "cpu", *extra]


@pytest.mark.parametrize(("extra", "message"), [
    (["--batch-size", "-2"], "--batch-size must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--steps", "-1"], "--steps must be at least 0"),
    (["--steps", "5000"], "--steps 5000 exceeds the model's 1000 diffusion steps"),
    (["--samples", "100000000"], "--samples 100000000 would need"),
    (["--sampler", "euler"], "method: Input should be 'ddpm', 'ddim' or 'dpmpp'"),
])
def test_predict_rejects_bad_numbers_before_writing(tiny_run, prepared_xenium, tmp_path, extra, message):
    out = tmp_path / "pred.h5ad"
    result = _run(_predict_args(tiny_run, prepared_xenium, out) + extra)
    _one_line_error(result, message)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_predict_on_cuda_without_cuda(tiny_run, prepared_xenium, tmp_path):
    args = _predict_args(tiny_run, prepared_xenium, tmp_path / "p.h5ad")
    args[args.index("cpu")] = "cuda"
    _one_line_error(_run(args), "Device 'cuda' was requested but this machine has no usable CUDA GPU")


def test_predict_out_must_be_h5ad_and_never_replaces_foreign_files(tiny_run, prepared_xenium, tmp_path):
    _one_line_error(_run(_predict_args(tiny_run, prepared_xenium, tmp_path / "pred.csv")), "ending in .h5ad")
    foreign = tmp_path / "cells.h5ad"
    foreign.write_bytes(b"somebody else's file")
    _one_line_error(_run(_predict_args(tiny_run, prepared_xenium, foreign, "--overwrite")), "Refusing to replace")
    assert foreign.read_bytes() == b"somebody else's file"


def test_predict_replaces_its_own_output_and_clears_leftovers(tiny_run, prepared_xenium, tmp_path):
    out = tmp_path / "pred.h5ad"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".pred.h5ad.partial-{dead.pid}-0").write_bytes(b"half")
    assert _run(_predict_args(tiny_run, prepared_xenium, out)).exit_code == 0
    _one_line_error(_run(_predict_args(tiny_run, prepared_xenium, out)), "already exists; pass --overwrite")
    result = _run(_predict_args(tiny_run, prepared_xenium, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.h5ad", "pred.metrics.json"]


def test_nan_checkpoint_fails_naming_it(tiny_run, prepared_xenium, tmp_path):
    """A diverged run: a valid checkpoint whose weights are NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    from diffst.runs import latest_checkpoint

    run = tmp_path / "diverged"
    import shutil

    shutil.copytree(tiny_run, run)
    ckpt = latest_checkpoint(run)
    for name in ("ema.safetensors", "model.safetensors"):
        state = load_file(ckpt / name)
        save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
                  ckpt / name, metadata={"format": "diffst-checkpoint-1", "step": "4"})
    _refresh_manifest(ckpt)
    out = tmp_path / "pred.h5ad"
    _one_line_error(_run(_predict_args(run, prepared_xenium, out)), str(ckpt), "NaN")
    assert not out.exists()


def _refresh_manifest(ckpt: Path) -> None:
    """Re-seal a checkpoint whose files the test rewrote on purpose (when checkpoints carry a manifest)."""
    import hashlib

    manifest = ckpt / "manifest.json"
    if not manifest.exists():
        return
    entries = json.loads(manifest.read_text())
    files = entries.get("files", entries)
    for name in list(files):
        data = (ckpt / name).read_bytes()
        if isinstance(files[name], dict):
            files[name].update({k: v for k, v in (("size", len(data)), ("sha256", hashlib.sha256(data).hexdigest()))
                                if k in files[name]})
    manifest.write_text(json.dumps(entries))


def test_non_finite_predictions_are_never_handed_on():
    mean = np.ones((2, 3, 4, 4), np.float32)
    mean[1, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="run/checkpoints/step_1 produced non-finite values"):
        check_finite(TilePredictions(mean=mean, std=np.zeros_like(mean), samples_model=mean[None]),
                     "run/checkpoints/step_1")


def test_gene_mismatch_names_the_genes_that_differ(prepared_xenium):
    own = PreparedTiles(prepared_xenium, "test").normaliser
    renamed = LogScaleNormaliser(genes=["FAKE1", *own.genes[1:]], scale=own.scale)
    with pytest.raises(InputError, match=rf"model's genes FAKE1 are not in the dataset; the dataset's genes "
                                         rf"{own.genes[0]} are not in the model"):
        PreparedTiles(prepared_xenium, "test", normaliser=renamed)
    swapped = LogScaleNormaliser(genes=[own.genes[1], own.genes[0], *own.genes[2:]], scale=own.scale)
    with pytest.raises(InputError, match=f"position 0 is {own.genes[1]} for the model but {own.genes[0]}"):
        PreparedTiles(prepared_xenium, "test", normaliser=swapped)


# ---- demo options are checked before minutes of training ---------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "benchmark"])
def test_folder_outputs_refuse_a_file(tmp_path, command):
    f = tmp_path / "results.txt"
    f.write_text("mine")
    args = [command, "--out", str(f)] + (["--example"] if command == "benchmark" else [])
    _one_line_error(_run(args), "it is a file, and the", "is a folder")
    assert f.read_text() == "mine"


@pytest.mark.parametrize(("extra", "message"), [
    (["--samples", "0"], "--samples must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--scale", "7"], "scale"),
])
def test_demo_checks_options_before_work(tmp_path, extra, message):
    started = time.time()
    result = _run(["demo", "--out", str(tmp_path / "demo"), *extra])
    _one_line_error(result, message)
    assert time.time() - started < 30 and not (tmp_path / "demo").exists()
