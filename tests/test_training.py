"""Training: config validation and presets, overfitting one real tile, kill-and-resume reproducibility (for the
diffusion and the regression objective), 2-process DDP, weights-only checkpoints read back by the run layer."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffst.config import ConfigError, load_config, parse_config, preset_names, resolve_config
from diffst.runs import list_checkpoints, load_run, read_training_state
from diffst.training import train
from diffst.training.data import EpochOrder


def _config(prepared: Path, run_dir: Path, **train) -> dict:
    """A run of the packaged ``tiny`` preset (8 steps, checkpoints every 4, on the CPU) with ``train`` overrides."""
    return dict(preset="tiny", data=dict(path=str(prepared)), model={}, train=train, seed=3, run_dir=str(run_dir))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# -- (d) configuration errors ------------------------------------------------------------------------


def test_config_unknown_key_is_named(tmp_path):
    data = _config(tmp_path, tmp_path / "run")
    data["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(_write(tmp_path / "c.yaml", data))
    data = _config(tmp_path, tmp_path / "run")
    data["model"]["base_chanels"] = 8
    with pytest.raises(ConfigError, match="base_chanels"):
        parse_config(data)
    with pytest.raises(ConfigError, match="optimiser"):
        parse_config({**_config(tmp_path, tmp_path / "run"), "optimiser": "sgd"})


def test_config_bad_values_are_named(tmp_path):
    cases = [
        (("train", "lr"), -1.0, r"train\.lr"),
        (("train", "ema_decay"), 1.5, r"train\.ema_decay"),
        (("data", "batch_size"), 0, r"data\.batch_size"),
        (("model", "preset"), "gpu", r"model\.preset"),
        (("model", "base_channels"), 2, "base_channels"),
        (("diffusion", "loss"), "l1", r"diffusion\.loss"),
    ]
    for (section, key), value, pattern in cases:
        data = _config(tmp_path, tmp_path / "run")
        data.setdefault(section, {})[key] = value
        with pytest.raises(ConfigError, match=pattern):
            parse_config(data)
    data = _config(tmp_path, tmp_path / "run")
    data["device"] = "tpu"
    with pytest.raises(ConfigError, match="device"):
        parse_config(data)
    data = _config(tmp_path, tmp_path / "run")
    data["train"].update(steps=8, epochs=3)  # steps and epochs together
    with pytest.raises(ConfigError, match="exactly one of steps or epochs"):
        parse_config(data)
    data = _config(tmp_path, tmp_path / "run")
    data["data"]["val_split"] = "test"
    with pytest.raises(ConfigError, match="test split"):
        parse_config(data)
    (tmp_path / "broken.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_config_resolution_is_idempotent_and_checks_dataset(tmp_path):
    cfg = parse_config(_config(tmp_path, "run"))
    resolved = resolve_config(cfg, n_genes=8, image_channels=1)
    assert resolved.model.preset is None
    assert resolved.model_config_resolved().n_genes == 8
    assert resolved.model_config_resolved().base_channels == 16
    assert Path(resolved.run_dir).is_absolute()
    assert resolve_config(resolved, 8, 1).to_dict() == resolved.to_dict()
    with pytest.raises(ConfigError, match="n_genes"):
        resolve_config(resolved, n_genes=25, image_channels=1)


def test_presets_are_expanded_and_overridden(tmp_path):
    assert {"cpu", "paper", "tiny"} <= set(preset_names())
    cpu = parse_config({"preset": "cpu", "data": {"path": "p", "example": {"scale": 10}}, "run_dir": "r"})
    assert (cpu.data.example.scale, cpu.data.example.n_genes, cpu.data.example.train_stride_um) == (10, 25, 20)
    assert (cpu.diffusion.parameterization, cpu.sampler.method, cpu.train.objective) == ("v", "dpmpp", "diffusion")
    paper = parse_config({"preset": "paper", "data": {"path": "p"}, "train": {"steps": 5}, "run_dir": "r"})
    assert (paper.train.steps, paper.train.epochs) == (5, None)  # steps replace the preset's epochs
    with pytest.raises(ConfigError, match=r"unknown run preset 'gpu'; choose one of \['cpu', 'paper'"):
        parse_config({"preset": "gpu", "data": {"path": "p"}, "run_dir": "r"})
    # learn_sigma lives in the diffusion section only; the model's output channels follow it.
    with pytest.raises(ConfigError, match="learn_sigma is set by diffusion.learn_sigma"):
        parse_config(dict(_config(tmp_path, "run"), model={"learn_sigma": False}))
    data = _config(tmp_path, "run")
    data["diffusion"] = {"learn_sigma": False}
    resolved = resolve_config(parse_config(data), n_genes=8, image_channels=1)
    assert "learn_sigma" not in resolved.to_dict()["model"] and resolved.model_config_resolved().out_channels == 8


def test_example_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    cpu = load_config(root / "cpu_xenium.yaml")
    paper = load_config(root / "paper_xenium.yaml")
    assert cpu.model.preset == "cpu"
    paths = {"data": {"path": cpu.data.path}, "run_dir": cpu.run_dir}
    assert cpu.to_dict() == parse_config({"preset": "cpu", **paths}).to_dict()  # the preset, with its paths
    assert paper.model.preset == "paper"
    assert (paper.data.batch_size, paper.train.lr, paper.train.epochs) == (4, 1e-4, 200)
    assert paper.train.weight_decay == 1e-5 and paper.train.betas == (0.9, 0.999)


def test_epoch_order_shards_and_resumes():
    orders = [EpochOrder(range(7), batch_size=2, world_size=2, rank=r, seed=1) for r in range(2)]
    epoch0 = [orders[r].epoch_tiles(0) for r in range(2)]
    assert len(epoch0[0]) == len(epoch0[1]) == 4
    assert set(epoch0[0]) | set(epoch0[1]) == set(range(7))
    assert orders[0].epoch_tiles(0) != orders[0].epoch_tiles(1)
    assert orders[0].batches(0, 1) == orders[0].batches(0)[1:]
    assert EpochOrder(range(7), 2, 2, 0, seed=1).epoch_tiles(5) == orders[0].epoch_tiles(5)


# -- (a) a tiny model overfits one real tile -----------------------------------------------------------


@pytest.mark.parametrize("objective, column", [("diffusion", "diffusion_loss"), ("regression", "mse")])
def test_overfits_one_tile(prepared, tmp_path, one_thread, objective, column):
    data = _config(prepared, tmp_path / "overfit", steps=60, lr=2e-3, checkpoint_every=1000, curriculum=False,
                   objective=objective)
    # One real tile, four copies per batch (different timesteps / noise) to steady the loss estimate.
    data["data"].update(subset=[0, 0, 0, 0], batch_size=4, augment=False)
    run_dir = train(parse_config(data))
    losses = [float(r[column]) for r in _read_metrics(run_dir)]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


# -- (e, f) checkpoint contents -------------------------------------------------------------------------


def test_checkpoint_weights_only_and_config(prepared, tmp_path, one_thread):
    cfg = parse_config(_config(prepared, tmp_path / "ckpt", steps=4, checkpoint_every=2, keep_last=1))
    run_dir = train(cfg)
    ckpts = list_checkpoints(run_dir)
    assert [s for s, _ in ckpts] == [4]  # keep_last=1
    folder = ckpts[-1][1]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    # (e) everything loads without unpickling arbitrary objects
    opt = torch.load(folder / "optimizer.pt", weights_only=True)
    rng = torch.load(folder / "rng.pt", weights_only=True)
    assert opt["state"] and "torch" in rng and "numpy" in rng and "python" in rng
    ema = load_file(folder / "ema.safetensors")
    run = load_run(run_dir)
    model = run.model
    assert not model.training and run.weights == "ema" and run.path == folder
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
    live = load_run(folder, ema=False).model
    assert any(not torch.equal(a, b) for a, b in zip(live.state_dict().values(), model.state_dict().values(), strict=True))
    assert run.step == 4
    from diffst.data.dataset import PreparedTiles
    from diffst.models.graph import coexpression_matrix

    tiles = PreparedTiles(prepared, "train")
    np.testing.assert_allclose(run.coexpression, coexpression_matrix(np.asarray(tiles.hr_counts)), rtol=1e-6, atol=1e-7)
    assert run.entropy_threshold is not None  # curriculum on: final gamma recorded
    assert (run.dataset.genes, run.dataset.image_channels, run.dataset.geometry) == (tiles.genes, 1, tiles.geometry)
    assert run.dataset.normaliser == tiles.normaliser
    # Each artifact is written once: the configuration in config.yaml, the co-expression matrix with the weights.
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "ema.safetensors", "manifest.json",
                                                        "model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    assert "config" not in json.loads((folder / "state.json").read_text())
    # (f) the saved configuration is the resolved configuration
    resolved = resolve_config(cfg, 8, 1)
    assert run.config.to_dict() == resolved.to_dict()
    assert load_config(folder / "config.yaml").to_dict() == resolved.to_dict()
    assert load_config(run_dir / "config.yaml").to_dict() == resolved.to_dict()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["finished"]
    assert "no validation" in info["validation"]  # this dataset has no val split; test is never used
    rows = _read_metrics(run_dir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss", "eps_mse", "vlb", "disentangle", "lr", "gamma", "seconds"} <= set(rows[0])
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(cfg)


def test_validation_split_is_used_when_present(prepared, tmp_path, one_thread):
    import shutil

    # The example crop is too small for a held-out val region, so give a copy a 'val' split to check the wiring.
    copy = tmp_path / "prep_val"
    shutil.copytree(prepared, copy)
    shutil.copytree(copy / "train", copy / "val")
    data = _config(copy, tmp_path / "val_run", steps=4, val_every=2, checkpoint_every=4)
    data["train"]["val_batches"] = 2
    run_dir = train(parse_config(data))
    with open(run_dir / "val.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert r["split"] == "val"
        assert all(float(r[k]) > 0 for k in ("val_loss", "val_eps_mse", "val_loss_ema", "val_eps_mse_ema"))
    assert "validation on split 'val'" in json.loads((run_dir / "run_info.json").read_text())["validation"]


# -- (b) resume after a real SIGKILL reproduces an uninterrupted run --------------------------------------


@pytest.mark.parametrize("objective", ["diffusion", "regression"])
def test_resume_after_kill_matches_uninterrupted(prepared, tmp_path, one_thread, objective):
    steps = 20
    reference = train(parse_config(_config(prepared, tmp_path / "ref", steps=steps, objective=objective)))

    cfg_file = _write(tmp_path / "killed.yaml", _config(prepared, tmp_path / "killed", steps=steps, objective=objective))
    cmd = [sys.executable, "-m", "diffst.training", "--config", str(cfg_file)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "step_00000004"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the training subprocess never wrote its first checkpoint"
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(s for s, _ in list_checkpoints(tmp_path / "killed"))
    assert killed_at < steps

    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ref = read_training_state(reference)
    res = read_training_state(tmp_path / "killed")
    assert res["state"]["step"] == ref["state"]["step"] == steps
    for part in ("model", "ema"):
        assert ref[part].keys() == res[part].keys()
        for k in ref[part]:
            torch.testing.assert_close(res[part][k], ref[part][k], rtol=1e-6, atol=1e-6, msg=f"{part}.{k}")
    ref_opt, res_opt = ref["optimizer"]["state"], res["optimizer"]["state"]
    assert ref_opt.keys() == res_opt.keys()
    for i in ref_opt:
        for k in ref_opt[i]:
            torch.testing.assert_close(res_opt[i][k], ref_opt[i][k], rtol=1e-6, atol=1e-6)
    assert res["state"]["ema_updates"] == steps
    assert res["config"].train.objective == objective
    steps_logged = [int(r["step"]) for r in _read_metrics(tmp_path / "killed")]
    assert steps_logged == list(range(1, steps + 1))  # rows logged after the checkpoint were replaced


# -- (c) data-parallel on 2 CPU processes ---------------------------------------------------------------


def test_two_process_data_parallel(prepared, tmp_path):
    cfg_file = _write(tmp_path / "ddp.yaml", _config(prepared, tmp_path / "ddp", steps=6, checkpoint_every=3))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffst.training", "--config", str(cfg_file)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["finished"] and info["final_step"] == 6
    assert info["effective_batch_size"] == 4
    sums = info["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold identical weights
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp")] == [3, 6]
    assert [int(r["step"]) for r in _read_metrics(tmp_path / "ddp")] == list(range(1, 7))
    model = load_run(tmp_path / "ddp").model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_regression_run_predicts_deterministically(prepared, tmp_path, one_thread):
    from diffst.inference.predict import predict_checkpoint

    run_dir = train(parse_config(_config(prepared, tmp_path / "reg", steps=2, checkpoint_every=2, objective="regression")))
    _, first, extras = predict_checkpoint(run_dir, prepared, sampler={"num_samples": 3}, seed=0, device="cpu",
                                          progress=False)
    _, again, _ = predict_checkpoint(run_dir, prepared, seed=5, device="cpu", progress=False)
    assert first.samples_model.shape[0] == 1 and not first.std.any()  # one deterministic prediction per tile
    np.testing.assert_array_equal(first.mean, again.mean)
    assert np.isfinite(first.mean).all() and extras["step"] == 2
