"""Two-stage runs (CorrDiff-style): a diffusion of the residual over a frozen regression run.

``diffusion.target: regression_residual`` with ``train.base_run``: trains, records its base run in every
checkpoint, resumes after SIGKILL bit for bit, predicts finite counts; a zero residual decodes to the
regression's prediction exactly; a missing base run is a clear InputError.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffst.config import ConfigError, parse_config
from diffst.diffusion.target import decode_target, encode_target
from diffst.errors import InputError
from diffst.runs import list_checkpoints, load_run, read_training_state
from diffst.training import train
from test_training import _config as tiny_config
from test_training import _env


@pytest.fixture(scope="module")
def base_run(prepared, tmp_path_factory) -> Path:
    """A finished tiny regression run (4 steps) on ``prepared``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("base") / "reg"
        return train(parse_config(_config(prepared, run_dir, None, steps=4, objective="regression")))
    finally:
        torch.set_num_threads(before)


def _config(prepared: Path, run_dir: Path, base: Path | None, **train_kw) -> dict:
    """The tiny run of test_training, made two-stage on ``base`` when given."""
    if base is None:
        return tiny_config(prepared, run_dir, **train_kw)
    cfg = tiny_config(prepared, run_dir, **train_kw, base_run=str(base))
    cfg["diffusion"] = {"target": "regression_residual", "parameterization": "v"}
    return cfg


def test_zero_residual_decodes_to_the_regression_exactly():
    gen = torch.Generator().manual_seed(0)
    hr, base = torch.rand(2, 3, 20, 20, generator=gen) * 2 - 1, torch.rand(2, 3, 20, 20, generator=gen) * 2 - 1
    lr = torch.rand(2, 3, 4, 4, generator=gen)
    assert torch.equal(decode_target(torch.zeros_like(base), lr, "regression_residual", base), base)
    x0 = encode_target(hr, lr, "regression_residual", base)
    torch.testing.assert_close(x0, (hr - base) / 2)
    torch.testing.assert_close(decode_target(x0, lr, "regression_residual", base), hr)
    with pytest.raises(ValueError, match="base"):
        encode_target(hr, lr, "regression_residual")


def test_config_needs_base_run_with_its_target(tmp_path):
    cfg = _config(tmp_path, tmp_path / "r", tmp_path / "base", steps=2)
    del cfg["train"]["base_run"]
    with pytest.raises(ConfigError, match="needs train.base_run"):
        parse_config(cfg)
    with pytest.raises(ConfigError, match="only used with diffusion.target: regression_residual"):
        parse_config(_config(tmp_path, tmp_path / "r", None, steps=2, base_run=str(tmp_path)))


def test_missing_or_wrong_base_run_is_an_input_error(prepared, base_run, tmp_path, one_thread):
    with pytest.raises(InputError, match="base run .*does not exist"):
        train(parse_config(_config(prepared, tmp_path / "a", tmp_path / "nowhere", steps=2)))
    diffusion_run = train(parse_config(_config(prepared, tmp_path / "diff", None, steps=1, checkpoint_every=1)))
    with pytest.raises(InputError, match="not a plain regression run"):
        train(parse_config(_config(prepared, tmp_path / "b", diffusion_run, steps=2)))


def test_two_stage_run_resumes_after_kill_and_predicts(prepared, base_run, tmp_path, one_thread):
    from diffst.inference.predict import predict_checkpoint

    base_run = Path(shutil.copytree(base_run, tmp_path / "base"))  # this test deletes it at the end
    steps = 12
    reference = train(parse_config(_config(prepared, tmp_path / "ref", base_run, steps=steps)))

    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(prepared, tmp_path / "killed", base_run, steps=steps)))
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
    assert max(s for s, _ in list_checkpoints(tmp_path / "killed")) < steps
    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ref, res = read_training_state(reference), read_training_state(tmp_path / "killed")
    assert res["state"]["step"] == ref["state"]["step"] == steps
    for part in ("model", "ema"):
        for k in ref[part]:
            torch.testing.assert_close(res[part][k], ref[part][k], rtol=1e-6, atol=1e-6, msg=f"{part}.{k}")

    base = load_run(base_run)
    assert res["state"]["base_run"] == {"path": str(base.path), "step": base.step}
    info = json.loads((tmp_path / "killed" / "run_info.json").read_text())
    assert info["base_run"]["step"] == base.step

    run = load_run(reference)
    assert run.base is not None and run.base.path == base.path
    _, preds, _ = predict_checkpoint(reference, prepared, sampler={"steps": 2, "num_samples": 2, "probe_draws": 2},
                                     device="cpu", progress=False)
    assert np.isfinite(preds.mean).all() and np.isfinite(preds.std).all() and (preds.mean >= 0).all()

    # The base's prediction inside a two-stage run is exactly what the regression run predicts on its own
    # (both averaged over the same square symmetries, sampler.point_views).
    dataset, reg, _ = predict_checkpoint(base_run, prepared, device="cpu", progress=False,
                                         sampler={"spot_consistent": False, "point_views": 8})
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    base_counts = dataset.normaliser.to_counts(run.base.predict_hr(batch, "cpu", views=8).float().numpy())
    np.testing.assert_allclose(base_counts, reg.mean, rtol=1e-5, atol=1e-5)

    # Without its base run a two-stage run cannot predict: a clear error naming the missing folder.
    shutil.rmtree(base_run / "checkpoints" / base.path.name)
    with pytest.raises(InputError, match="base run .*does not exist"):
        load_run(reference)
