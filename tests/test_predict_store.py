"""Bounded-memory prediction: per-tile store, resume after an interruption or kill -9, band-wise stitching.

``diffst predict`` writes each finished tile to ``.NAME.partial/`` beside its output and stitches the output
band by band from there; a rerun of an interrupted command reuses the finished tiles and gives the same
output, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from diffst.cli import app
from diffst.errors import InputError
from diffst.inference.store import TileStore, store_path

runner = CliRunner()


# ---- the store on its own -------------------------------------------------------------------------------


def test_store_reuses_tiles_of_the_same_setup_only(tmp_path):
    path = store_path(tmp_path / "pred.h5ad")
    assert path == tmp_path / ".pred.h5ad.partial"
    tile = {"mean": np.ones((2, 3, 3), np.float32), "std": np.zeros((2, 3, 3), np.float32)}
    with TileStore.open(path, {"seed": 0}) as store:
        store.write(0, tile)
        store.write(3, tile)
        assert store.finished() == {0, 3}
        np.testing.assert_array_equal(store.read(3)["mean"], tile["mean"])
        # One prediction per store: a second process (or a second open) is refused while it is held.
        with pytest.raises(InputError, match="Another diffst predict"):
            TileStore.open(path, {"seed": 0})
    with TileStore.open(path, {"seed": 0}) as store:  # same setup: the tiles are reused
        assert store.finished() == {0, 3}
    with TileStore.open(path, {"seed": 1}) as store:  # another setup: stale tiles are discarded
        assert store.finished() == set()
        store.write(1, tile)
        (path / "tile_0000001.npz").write_bytes(b"truncated")  # damaged on disk: read as missing
        assert store.read(1) is None
        store.remove()
    assert not path.exists()


def test_store_leaves_a_folder_it_did_not_create_alone(tmp_path):
    path = store_path(tmp_path / "pred.h5ad")
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by Diff-ST"):
        TileStore.open(path, {"seed": 0})
    assert (path / "notes.txt").read_text() == "mine"


# ---- band-wise stitching equals stitching the whole grid ---------------------------------------------------


def test_band_stitching_equals_whole_grid_stitching():
    from diffst.inference.output import iter_bands, tile_offsets
    from diffst.inference.predict import stitch
    from diffst.inference.whole_slide import SeamAccumulator, seam_jump, tile_window

    rng = np.random.default_rng(0)
    # 3 x 4 tiles of 20 bins at a 10-bin stride, one missing (a hole in the tissue), 2 genes.
    tiles = pd.DataFrame([(c * 100.0 + 50, r * 100.0 + 20) for r in range(3) for c in range(4) if (r, c) != (1, 2)],
                         columns=["x0_um", "y0_um"])
    maps = {"mean": rng.gamma(2.0, 1.0, (len(tiles), 2, 20, 20)), "std": rng.gamma(1.0, 1.0, (len(tiles), 2, 20, 20))}
    for window in (None, tile_window(20)):
        table = stitch(tiles, maps, 10.0, window)
        offs_r, offs_c, _, _ = tile_offsets(tiles, 10.0)
        acc = SeamAccumulator(offs_r, offs_c, offs_r.max() + 20, offs_c.max() + 20, 20)
        rows, cols, values = [], [], {k: [] for k in maps}
        for band in iter_bands(offs_r, offs_c, 20, lambda j: {k: v[j] for k, v in maps.items()}, list(maps), window,
                               band_rows=7):
            acc.add(band.grid("mean"))
            r, c = band.covered()
            rows.append(r)
            cols.append(c)
            for key in maps:
                values[key].append(band.values(key))
        np.testing.assert_array_equal(np.concatenate(rows), table["row"].to_numpy())
        np.testing.assert_array_equal(np.concatenate(cols), table["col"].to_numpy())
        for key in maps:  # the same sums in the same order: equal bit for bit
            np.testing.assert_array_equal(np.concatenate(values[key]), table.attrs["maps"][key])
        whole = seam_jump(table, table.attrs["maps"]["mean"], tiles, 10.0, 20)
        banded = acc.result()
        assert {k: banded[k] for k in ("n_seam_pairs", "n_inside_pairs")} == \
            {k: whole[k] for k in ("n_seam_pairs", "n_inside_pairs")}
        for key in ("seam_mean_abs_diff", "inside_mean_abs_diff", "ratio"):
            assert banded[key] == pytest.approx(whole[key], rel=1e-12)


def test_streamed_h5ad_equals_the_in_memory_anndata(tiny_xenium_run, prepared_xenium, tmp_path):
    import anndata as ad

    from diffst.inference.output import MemoryTiles, write_h5ad_stream
    from diffst.inference.predict import predict_checkpoint, to_anndata

    dataset, preds, _ = predict_checkpoint(tiny_xenium_run, prepared_xenium, sampler={"num_samples": 2}, device="cpu",
                                           progress=False, keep_samples=False)
    assert preds.samples_model is None and preds.num_samples == 2
    for blend in ("mean", "window"):
        memory = to_anndata(dataset, preds, extra_uns={"note": "x"}, blend=blend)
        out = tmp_path / f"{blend}.h5ad"
        info = write_h5ad_stream(dataset, MemoryTiles(preds), out, extra_uns={"note": "x"}, blend=blend)
        streamed = ad.read_h5ad(out)
        assert info["n_obs"] == streamed.n_obs == memory.n_obs
        np.testing.assert_array_equal(streamed.X, memory.X)
        assert sorted(streamed.layers) == sorted(memory.layers) == ["observed", "q05", "q25", "q75", "q95", "std"]
        for key in memory.layers:
            np.testing.assert_array_equal(streamed.layers[key], memory.layers[key])
        pd.testing.assert_frame_equal(streamed.obs, memory.obs)
        assert list(streamed.var_names) == list(memory.var_names)
        for key in ("spatial", "spatial_um"):
            np.testing.assert_allclose(streamed.obsm[key], memory.obsm[key], rtol=0, atol=1e-9)
        for name, entry in memory.uns["spatial"].items():
            np.testing.assert_array_equal(streamed.uns["spatial"][name]["images"]["hires"], entry["images"]["hires"])
            assert streamed.uns["spatial"][name]["scalefactors"] == pytest.approx(entry["scalefactors"])
        assert streamed.uns["diffst"]["note"] == "x" and streamed.uns["diffst"]["num_samples"] == 2
        assert ("seams" in streamed.uns["diffst"]) == (blend == "window")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.h5ad", "window.h5ad"]  # nothing left beside


def test_a_coarse_mosaic_keeps_the_hires_image():
    """A mosaic finer than the hires image is averaged over pixel blocks first; the image barely changes."""
    from diffst.inference.histology import hires_image, mosaic_tiles
    from diffst.inference.output import slide_histology

    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 255, (6, 3, 8, 8)), np.ones((1, 1, 16, 16))).astype(np.uint8)  # 128 px tiles
    x0 = np.array([0, 200, 400, 0, 200, 400], float) * 10
    y0 = np.array([0, 0, 0, 200, 200, 200], float) * 10
    um_to_px = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 1]])  # 0.5 µm/px full resolution
    full, scalef_full = hires_image(mosaic_tiles(smooth, x0, y0, 2000.0), um_to_px, max_side=100)
    coarse, scalef, um_per_px = slide_histology(smooth, x0, y0, 2000.0, um_to_px, max_side=100)
    assert um_per_px > 2000.0 / 128 and scalef == pytest.approx(scalef_full) and coarse.shape == full.shape
    assert np.abs(coarse.astype(int) - full).mean() < 3


# ---- resume after an interruption -------------------------------------------------------------------------


def _predict_args(run, data, out, *extra):
    return ["predict", "--checkpoint", str(run), "--data", str(data), "--out", str(out), "--samples", "2",
            "--device", "cpu", "--batch-size", "1", "--no-evaluate", *extra]


def _same_prediction(a, b):
    import anndata as ad

    a, b = ad.read_h5ad(a), ad.read_h5ad(b)
    np.testing.assert_array_equal(a.X, b.X)
    assert sorted(a.layers) == sorted(b.layers)
    for key in a.layers:
        np.testing.assert_array_equal(a.layers[key], b.layers[key])
    pd.testing.assert_frame_equal(a.obs, b.obs)


def test_interrupted_predict_resumes_from_finished_tiles(tiny_xenium_run, prepared_xenium, tmp_path, monkeypatch,
                                                         one_thread):
    import diffst.inference.predict as predict_module

    whole = tmp_path / "whole.h5ad"
    result = runner.invoke(app, _predict_args(tiny_xenium_run, prepared_xenium, whole))
    assert result.exit_code == 0, result.output
    assert "Resumed" not in result.output and not store_path(whole).exists()  # removed once written

    # Interrupt after the first batch's tile is written (Ctrl-C lands there as a KeyboardInterrupt).
    real = predict_module.predict_to_store

    def interrupted(*args, **kwargs):
        def stop(_part):
            raise KeyboardInterrupt

        return real(*args, **{**kwargs, "on_batch": stop})

    out = tmp_path / "pred.h5ad"
    monkeypatch.setattr(predict_module, "predict_to_store", interrupted)
    result = runner.invoke(app, _predict_args(tiny_xenium_run, prepared_xenium, out))
    assert result.exit_code == 130
    assert "1 finished tiles are kept" in result.output
    assert not out.exists() and sorted(p.name for p in store_path(out).iterdir()) == \
        ["lock", "manifest.json", "tile_0000000.npz"]
    manifest = json.loads((store_path(out) / "manifest.json").read_text())
    assert manifest["identity"]["seed"] == 0 and manifest["identity"]["num_samples"] == 2
    assert manifest["identity"]["run"]["sha256"] and manifest["identity"]["input"]["arrays_sha256"]["lr_counts"]

    monkeypatch.setattr(predict_module, "predict_to_store", real)
    result = runner.invoke(app, _predict_args(tiny_xenium_run, prepared_xenium, out))
    assert result.exit_code == 0, result.output
    assert "Resumed: 1 of 3 tiles were already predicted" in result.output
    assert not store_path(out).exists()
    _same_prediction(out, whole)  # bit for bit


def test_rerun_with_another_seed_does_not_reuse_tiles(tiny_xenium_run, prepared_xenium, tmp_path, one_thread):
    out = tmp_path / "pred.h5ad"
    with TileStore.open(store_path(out), {"made by": "an older setup"}) as store:
        store.write(0, {"mean": np.full((8, 20, 20), 1e6, np.float32), "std": np.zeros((8, 20, 20), np.float32)})
    result = runner.invoke(app, _predict_args(tiny_xenium_run, prepared_xenium, out, "--seed", "4"))
    assert result.exit_code == 0, result.output
    assert "Resumed" not in result.output and not store_path(out).exists()
    fresh = tmp_path / "fresh.h5ad"
    assert runner.invoke(app, _predict_args(tiny_xenium_run, prepared_xenium, fresh, "--seed", "4")).exit_code == 0
    _same_prediction(out, fresh)


def test_predict_resumes_after_kill_9(tiny_xenium_run, prepared_xenium, tmp_path):
    """A real ``kill -9`` of ``diffst predict`` mid-way; the rerun reuses the finished tiles, same output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # Enough sampler steps that a tile takes a noticeable time, so that the kill lands between tiles.
    args = [sys.executable, "-m", "diffst.cli", *_predict_args(tiny_xenium_run, prepared_xenium, "OUT", "--steps", "40")]

    def command(out):
        return [str(out) if a == "OUT" else a for a in args]

    whole = tmp_path / "whole.h5ad"
    subprocess.run(command(whole), env=env, check=True, capture_output=True)
    out = tmp_path / "pred.h5ad"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = store_path(out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if store.is_dir() and any(p.name.startswith("tile_") and p.suffix == ".npz" for p in store.iterdir()):
            break
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not killed or out.exists():
        pytest.skip("the prediction finished before it could be killed (machine too fast for this test)")
    assert not out.exists() and store.is_dir()
    done = len([p for p in store.iterdir() if p.name.startswith("tile_") and p.name.endswith(".npz")])
    rerun = subprocess.run(command(out), env=env, check=True, capture_output=True, text=True)
    assert f"Resumed: {done} of 3 tiles were already predicted" in rerun.stdout
    assert not store.exists()
    _same_prediction(out, whole)
