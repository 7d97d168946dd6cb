"""`diffst train` faults a user can cause: each stops with one clear message and breaks nothing.

Real files, the real tiny model of test_training and real (short) training runs, some in subprocesses:
an example config aimed at a folder of the user's, two runs into one folder, damaged checkpoints,
Ctrl-C / SIGTERM, CUDA that is not there, unreadable configs and run folders that cannot be created.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffst.config import ConfigError, load_config, parse_config
from diffst.errors import InputError
from diffst.example import prepare_example_data
from diffst.runs import list_checkpoints, load_checkpoint, read_training_state
from diffst.training import checkpoint as ckpt
from diffst.training import train
from diffst.training.__main__ import main as train_main
from diffst.training.checkpoint import run_lock
from test_training import _config, _env, _read_metrics, _write

PY = sys.executable


def _re(path) -> str:
    return re.escape(str(path))


def _steps(run_dir: Path) -> list[int]:
    return [int(r["step"]) for r in _read_metrics(run_dir)]


def _wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the subprocess ended early with code {proc.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _run_main(capsys, args: list[str]) -> tuple[int, str]:
    code = train_main(args)
    return code, capsys.readouterr().err.strip()


# -- the built-in example is prepared (by the commands, before training) only into an absent or empty data.path --


def _example_config(data_path: Path, run_dir: Path, **train) -> dict:
    data = _config(data_path, run_dir, **train)
    data["data"]["example"] = dict(preset="cpu", scale=5, n_genes=8, train_stride_um=50)
    return data


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_example_never_replaces_the_users_data(tmp_path, capsys, kind):
    target = tmp_path / "mine"
    if kind == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("my data")
        expected = "a folder that is not empty"
    else:
        target.write_text("my data")
        expected = "a file"
    code, err = _run_main(capsys, ["--config", str(_write(tmp_path / "c.yaml",
                                                          _example_config(target, tmp_path / "run", steps=1)))])
    assert code == 2 and re.fullmatch(rf"error: data.path {_re(target)} is {expected} and holds no prepared dataset "
                                      r"\(no dataset.json\).*set data.path to a new or empty folder.*", err)
    assert (target / "notes.txt" if kind == "folder" else target).read_text() == "my data"
    assert not (tmp_path / "run").exists()


def test_example_run_dir_inside_data_path_is_refused(tmp_path):
    target = tmp_path / "prep"
    with pytest.raises(InputError, match=rf"run_dir {_re(target)}/run lies inside data.path {_re(target)}"):
        prepare_example_data(parse_config(_example_config(target, target / "run", steps=1)))
    assert not target.exists()


def test_example_is_prepared_into_an_empty_folder(tmp_path, one_thread):
    target = tmp_path / "empty"
    target.mkdir()
    cfg = parse_config(_example_config(target, tmp_path / "run", steps=1, checkpoint_every=1))
    with pytest.raises(InputError, match=rf"{_re(target)} is not a prepared Diff-ST dataset"):
        train(cfg)  # training itself never prepares data
    assert prepare_example_data(cfg) == target and (target / "dataset.json").is_file()
    assert prepare_example_data(cfg) is None  # a dataset is there now: used as it is
    run_dir = train(cfg)
    assert _steps(run_dir) == [1]


# -- one run folder, one training process ----------------------------------------------------------------


def test_second_training_into_a_busy_run_folder_is_refused(prepared, tmp_path, capsys):
    run_dir = (tmp_path / "busy").resolve()
    cfg_file = _write(tmp_path / "busy.yaml", _config(prepared, run_dir, steps=60, checkpoint_every=30))
    first = subprocess.Popen([PY, "-m", "diffst.training", "--config", str(cfg_file)], env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run_dir / ckpt.LOCK_FILE
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first)
        code, err = _run_main(capsys, ["--config", str(cfg_file)])
        assert first.poll() is None, "the first run ended before the second one started"
        assert code == 2
        assert err == (f"error: run folder {run_dir} is in use by process {first.pid} (another diffst train); "
                       "wait for it or choose another run_dir")
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert _steps(run_dir) == list(range(1, 61))
    assert [s for s, _ in list_checkpoints(run_dir)] == [30, 60]


def test_lock_of_a_killed_process_does_not_block(prepared, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [PY, "-c", "import sys, time\nfrom diffst.training.checkpoint import run_lock\n"
                   "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n",
         str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = parse_config(_config(prepared, run_dir, steps=2, checkpoint_every=2))
        with pytest.raises(InputError, match=f"in use by process {holder.pid}"):
            train(cfg)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / ckpt.LOCK_FILE).exists()  # left behind by the killed process
    train(cfg)
    assert _steps(run_dir) == [1, 2]


@pytest.mark.parametrize("with_fcntl", [True, False])
def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, monkeypatch, with_fcntl):
    if not with_fcntl:
        monkeypatch.setattr(ckpt, "fcntl", None)
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ckpt.LOCK_FILE).write_text(dead.stdout)  # a lock file whose process is gone
    with run_lock(tmp_path) as path:
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(InputError, match=rf"run folder {_re(tmp_path)} is in use by process {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    assert path.exists() == with_fcntl  # the flock file stays (harmless); the fallback's lock file goes
    with run_lock(tmp_path):
        pass


# -- damaged checkpoints -----------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated ema": ("ema.safetensors", _truncate, r"has \d+ bytes, manifest.json says \d+ \(truncated or overwritten\)"),
    "flipped byte in ema": ("ema.safetensors", _flip_byte, r"does not match its sha256 in manifest.json"),
    "garbage state.json": ("state.json", lambda p: p.write_text("{not json"), r"has \d+ bytes, manifest.json says \d+"),
    "missing config.yaml": ("config.yaml", Path.unlink, "is missing"),
    "missing state.json": ("state.json", Path.unlink, "is missing"),
    "garbage manifest": ("manifest.json", lambda p: p.write_text("[]"), "is not a valid checkpoint manifest"),
}


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """A finished 4-step run with one checkpoint (step 4)."""
    return train(parse_config(_config(prepared, tmp_path_factory.mktemp("trained") / "run", steps=4)))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_named_on_load(trained, tmp_path, damage):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    folder = list_checkpoints(run_dir)[-1][1]
    name, corrupt, problem = DAMAGE[damage]
    corrupt(folder / name)
    message = rf"checkpoint {_re(folder)} is damaged: {name} {problem}.*Use an older checkpoint"
    with pytest.raises(InputError, match=message):
        load_checkpoint(run_dir)
    with pytest.raises(InputError, match=message):
        read_training_state(folder)


@pytest.mark.parametrize("damage, name, problem", [
    ("intact", None, None),
    ("truncated ema", "ema.safetensors", r"cannot be read \(SafetensorError"),
    ("garbage state.json", "state.json", r"cannot be read \(JSONDecodeError"),
    ("garbage optimizer.pt", "optimizer.pt", r"cannot be read \("),
    ("empty rng.pt", "rng.pt", "is empty"),
])
def test_checkpoint_without_manifest_is_checked_as_far_as_possible(trained, tmp_path, damage, name, problem):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    folder = list_checkpoints(run_dir)[-1][1]
    (folder / "manifest.json").unlink()  # as written before manifests existed
    if name is None:
        model, _, extras = load_checkpoint(folder)
        assert extras["step"] == 4 and read_training_state(folder)["state"]["step"] == 4
        return
    path = folder / name
    {"truncated ema": _truncate, "empty rng.pt": lambda p: p.write_bytes(b"")}.get(
        damage, lambda p: p.write_text("{not json"))(path)
    with pytest.raises(InputError, match=rf"checkpoint {_re(folder)} is damaged: {name} {problem}"):
        read_training_state(folder)


@pytest.mark.parametrize("damage", ["truncated ema", "garbage state.json", "missing state.json"])
def test_resume_skips_a_damaged_latest_checkpoint(prepared, tmp_path, caplog, one_thread, damage):
    cfg = parse_config(_config(prepared, tmp_path / "run", steps=8, checkpoint_every=4))
    run_dir = train(cfg)
    name, corrupt, problem = DAMAGE[damage]
    latest = list_checkpoints(run_dir)[-1][1]
    corrupt(latest / name)
    cfg = parse_config(_config(prepared, tmp_path / "run", steps=10, checkpoint_every=4))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with caplog.at_level(logging.WARNING, logger="diffst.training"):
        train(cfg, resume=True)
    assert handlers == {s: signal.getsignal(s) for s in handlers}  # the loop's handlers are gone
    assert re.search(rf"skipping damaged checkpoint {_re(latest)}: checkpoint {_re(latest)} is damaged: {name} {problem}",
                     caplog.text)
    assert f"renamed damaged checkpoint {latest} to step_00000008.corrupt" in caplog.text
    assert (latest.parent / "step_00000008.corrupt" / "manifest.json").is_file()  # kept for inspection
    assert [s for s, _ in list_checkpoints(run_dir)] == [8, 10]
    assert read_training_state(run_dir)["state"]["step"] == 10
    assert _steps(run_dir) == list(range(1, 11))  # resumed from step 4


def test_resume_without_an_intact_checkpoint_is_refused(prepared, trained, tmp_path):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    folder = list_checkpoints(run_dir)[-1][1]
    (folder / "state.json").write_text("garbage")
    with pytest.raises(InputError, match=rf"cannot resume: no checkpoint in {_re(run_dir)}/checkpoints is "
                                         r"intact \(1 damaged"):
        train(parse_config(_config(prepared, run_dir, steps=4)), resume=True)
    assert folder.is_dir()  # nothing renamed when there is nothing to resume from


# -- SIGINT / SIGTERM: finish the step, save, say how to resume ---------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_finishes(prepared, tmp_path, sig):
    run_dir = (tmp_path / "run").resolve()
    cfg_file = _write(tmp_path / "c.yaml", _config(prepared, run_dir, steps=400, checkpoint_every=1000))
    log_file = tmp_path / "stderr.txt"
    with open(log_file, "w") as err:
        proc = subprocess.Popen([PY, "-m", "diffst.training", "--config", str(cfg_file)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_for(lambda: (run_dir / "metrics.csv").is_file() and len(_steps(run_dir)) >= 2, proc)
            proc.send_signal(sig)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    last = log_file.read_text().strip().splitlines()[-1]
    assert code == 130, last
    step = int(re.match(r"interrupted at step (\d+);", last).group(1))
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    assert last == (f"interrupted at step {step}; checkpoint saved to {folder}; "
                    f"resume with: diffst train --config {run_dir}/config.yaml --resume")
    assert 2 <= step < 400
    assert read_training_state(folder)["state"]["step"] == step
    assert _steps(run_dir) == list(range(1, step + 1))
    if sig == signal.SIGTERM:
        return
    done = subprocess.run([PY, "-m", "diffst.training", "--config", str(run_dir / "config.yaml"), "--resume",
                           "--set", f"train.steps={step + 3}"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps(run_dir) == list(range(1, step + 4))
    assert read_training_state(run_dir)["state"]["step"] == step + 3


# -- devices, configs, folders ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(prepared, tmp_path, capsys):
    data = _config(prepared, tmp_path / "run", steps=1)
    data["device"] = "cuda"
    code, err = _run_main(capsys, ["--config", str(_write(tmp_path / "c.yaml", data))])
    assert (code, err) == (2, "error: device: 'cuda' was requested but CUDA is not available; use 'auto' or 'cpu'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    ("- data\n- train\n", "the configuration must be a mapping of sections, got list"),
    ("just a sentence\n", "the configuration must be a mapping of sections, got str"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", r"is not a YAML text file \('utf-8' codec can't decode"),
    ("train: [unclosed\n", "is not valid YAML"),
])
def test_unusable_config_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(path, ["train.steps=1"])
    code, err = _run_main(capsys, ["--config", str(path)])
    assert code == 2 and err.startswith(f"error: {path}") and re.search(message, err)


def test_config_folder_is_refused(tmp_path, capsys):
    code, err = _run_main(capsys, ["--config", str(tmp_path)])
    assert (code, err) == (2, f"error: config file {tmp_path} is a folder, not a file")


@pytest.mark.parametrize("blocker", ["parent", "itself"])
def test_run_dir_that_cannot_be_created(prepared, tmp_path, blocker):
    (tmp_path / "afile").write_text("not a folder")
    run_dir = tmp_path / "afile" / "run" if blocker == "parent" else tmp_path / "afile"
    with pytest.raises(InputError, match=rf"cannot create run_dir {_re(run_dir)}: {_re(tmp_path)}/afile is a file, not a "
                                         "folder; choose another run_dir"):
        train(parse_config(_config(prepared, run_dir, steps=1)))
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_data_path_that_is_not_a_dataset(prepared, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match=rf"{_re(afile)} is not a prepared Diff-ST dataset \(no dataset.json\)"):
        train(parse_config(_config(afile, tmp_path / "run", steps=1)))
    copy = shutil.copytree(prepared, tmp_path / "prep")
    (copy / "dataset.json").write_text((copy / "dataset.json").read_text()[:100])
    with pytest.raises(InputError, match=rf"{_re(copy)}/dataset.json is corrupt"):
        train(parse_config(_config(copy, tmp_path / "run", steps=1)))


def test_home_folder_in_paths_is_expanded(prepared, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "prep").symlink_to(prepared)
    run_dir = train(parse_config(_config("~/prep", "~/run", steps=1, checkpoint_every=1)))
    assert run_dir == tmp_path / "run" and _steps(run_dir) == [1]
