"""Seed ensembles of Diff-ST's stage one: several regression runs answering as one.

The recipe trains stage one with seeds seed, seed + 1, ... (``diffst train --two-stage --stage-one-members``);
``train.base_run`` takes their list; the answer is the mean of the members' answers in counts (still
spot-consistent); stage two trains on that mean, computed once per tile and turned with the tile's
augmentation; predictions record every member.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from diffst.config import ConfigError, parse_config
from diffst.core.symmetry import SYMMETRIES, apply_symmetry
from diffst.data.dataset import PreparedTiles
from diffst.errors import InputError
from diffst.inference.predict import predict_checkpoint
from diffst.runs import load_base_run, load_run, read_training_state, regression_point
from diffst.training import train
from diffst.training.frozen_base import FrozenBase
from diffst.training.recipe import stage_one_config, train_two_stage
from test_training import _config as tiny_config


def _spot_config(prepared: Path, run_dir: Path, seed: int, steps: int = 6) -> dict:
    cfg = tiny_config(prepared, run_dir, steps=steps, objective="regression", regression="spot_poisson", lr=3e-3)
    cfg["seed"] = seed
    return cfg


@pytest.fixture(scope="module")
def members(prepared, tmp_path_factory) -> list[Path]:
    """Two tiny spot-ratio regression runs on ``prepared`` that differ only in their seed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("members")
        return [train(parse_config(_spot_config(prepared, root / f"seed{s}", s))) for s in (3, 4)]
    finally:
        torch.set_num_threads(before)


def _batch(prepared: Path, split: str = "test", augment: bool = False, seed: int = 0) -> tuple[PreparedTiles, dict]:
    tiles = PreparedTiles(prepared, split, augment=augment, seed=seed)
    return tiles, default_collate([tiles[i] for i in range(min(len(tiles), 6))])


def test_ensemble_answer_is_the_mean_of_its_members_in_counts(members, prepared, one_thread):
    ensemble = load_base_run(members)
    assert [m.path for m in (ensemble, *ensemble.members)] == [load_run(p).path for p in members]
    tiles, batch = _batch(prepared)
    norm = tiles.normaliser
    for views in (1, 2):
        alone = [norm.to_counts(load_run(p).predict_hr(batch, "cpu", views=views).numpy()) for p in members]
        together = norm.to_counts(ensemble.predict_hr(batch, "cpu", views=views).numpy())
        assert not np.allclose(alone[0], alone[1], atol=1e-3), "two seeds should answer differently"
        np.testing.assert_allclose(together, (alone[0] + alone[1]) / 2, rtol=1e-4, atol=1e-4)
    # Still spot-consistent: every s x s block of the mean adds up to its measured LR spot.
    s = tiles.geometry.scale
    lr = np.asarray(tiles.lr_counts[: len(together)], dtype=np.float64)
    blocks = together.reshape(*together.shape[:2], lr.shape[-2], s, lr.shape[-1], s).sum(axis=(3, 5))
    measured = np.asarray(tiles.lr_mask[: len(together)], bool)[:, None] & (lr > 0)
    np.testing.assert_allclose(blocks[np.broadcast_to(measured, blocks.shape)],
                               lr[np.broadcast_to(measured, lr.shape)], rtol=1e-3, atol=1e-3)
    # regression_point with one model is that model's answer alone.
    run = load_run(members[0])
    from diffst.models.base import Conditions

    cond = Conditions.from_batch(batch, run.entropy_threshold)
    shape = (len(batch["lr"]), len(run.dataset.genes), run.dataset.geometry.tile_hr, run.dataset.geometry.tile_hr)
    torch.testing.assert_close(regression_point((run.model,), cond, shape, run.config, run.dataset, 1),
                               regression_point(run.model, cond, shape, run.config, run.dataset, 1))


def test_ensemble_predicts_and_records_every_member(members, prepared, one_thread):
    ensemble = load_base_run(members)
    _, preds, extras = predict_checkpoint(members[0], prepared, device="cpu", progress=False, run=ensemble)
    _, first, _ = predict_checkpoint(members[0], prepared, device="cpu", progress=False)
    assert np.isfinite(preds.mean).all() and (preds.mean >= 0).all()
    assert not np.allclose(preds.mean, first.mean)
    assert extras["members"] == [str(load_run(members[1]).path)]


def test_members_of_other_data_or_kind_are_refused(members, prepared, tmp_path, one_thread):
    mse = train(parse_config(tiny_config(prepared, tmp_path / "mse", steps=1, objective="regression")))
    with pytest.raises(InputError, match="cannot be averaged"):
        load_base_run([members[0], mse])
    with pytest.raises(InputError, match="does not exist"):
        load_base_run([members[0], tmp_path / "nowhere"])
    with pytest.raises(ConfigError, match="empty list"):
        parse_config({**tiny_config(prepared, tmp_path / "two", steps=1, base_run=[]),
                      "diffusion": {"target": "regression_residual"}})


def test_frozen_base_turns_the_stored_answer_with_the_tile(members, prepared, one_thread):
    ensemble = load_base_run(members)
    frozen = FrozenBase(ensemble, prepared, "train", views=8)
    tiles, batch = _batch(prepared, "train", augment=True, seed=5)
    assert batch["symmetry"].ne(0).any(), "the augmentation should turn some tiles"
    answers = frozen.predict_hr(batch, "cpu")
    assert len(frozen) == len(tiles)  # every tile computed at once, in fixed chunks
    stored = default_collate([PreparedTiles(prepared, "train")[int(i)] for i in batch["index"]])
    plain = ensemble.predict_hr(stored, "cpu", views=8)
    for row, j in enumerate(batch["symmetry"].tolist()):
        turns, flip = SYMMETRIES[j]
        torch.testing.assert_close(answers[row], apply_symmetry(plain[row], turns, flip), rtol=1e-5, atol=1e-5)
    # The mean over all 8 symmetries is equivariant: asking with the turned tile gives the same answer.
    torch.testing.assert_close(answers, ensemble.predict_hr(batch, "cpu", views=8), rtol=1e-4, atol=1e-4)


def test_recipe_trains_members_with_successive_seeds_and_stage_two_on_their_mean(prepared, tmp_path, one_thread):
    config = {**tiny_config(prepared, tmp_path / "run", steps=2), "seed": 7,
              "diffusion": {"parameterization": "v"}}
    assert stage_one_config(config, 2, member=1)["seed"] == 8
    bases, second = train_two_stage(config, stage_one_steps=2, stage_one_members=2)
    assert [b.name for b in bases] == ["run-regression", "run-regression-member1"]
    assert [parse_config(stage_one_config(config, 2, m)).seed for m in (0, 1)] == [7, 8]
    state = read_training_state(second)["state"]
    assert [Path(r["path"]).parents[1].name for r in state["base_run"]] == ["run-regression", "run-regression-member1"]
    assert state["base_views"] == 4  # sampler.point_views, kept for resumption
    run = load_run(second)
    assert run.base is not None and len(run.base.members) == 1
    _, preds, extras = predict_checkpoint(second, prepared, sampler={"steps": 2, "num_samples": 2}, device="cpu",
                                          progress=False)
    assert np.isfinite(preds.mean).all() and np.isfinite(preds.std).all()
    assert len(extras["base_members"]) == 1
    from diffst.inference.provenance import prediction_provenance

    meta = json.loads((prepared / "dataset.json").read_text())
    record = prediction_provenance(extras, prepared, "test", meta, 2)
    assert record["base_members"] == extras["base_members"]
    # Reused, not retrained, when asked again.
    mtimes = [p.stat().st_mtime for p in sorted((bases[1] / "checkpoints").iterdir())]
    assert train_two_stage(config, stage_one_steps=2, stage_one_members=2)[0] == bases
    assert [p.stat().st_mtime for p in sorted((bases[1] / "checkpoints").iterdir())] == mtimes


def test_runs_resume_after_an_inference_setting_changed(prepared, tmp_path, one_thread):
    # A run trained when the sampler's defaults were other (e.g. point_views 8) resumes and is reused.
    # So does one saved before train.spot_ratio_shrink existed (it reads 0), and the new checkpoint answers
    # with the setting it was resumed with.
    cfg = {**_spot_config(prepared, tmp_path / "reg", 3, steps=2), "sampler": {"point_views": 8, "steps": 5}}
    cfg["train"]["spot_ratio_shrink"] = 0.0
    first = train(parse_config(cfg))
    cfg["sampler"] = {"point_views": 2}
    cfg["train"]["steps"] = 3
    cfg["train"]["spot_ratio_shrink"] = 0.5
    again = train(parse_config(cfg), resume=True)
    assert again == first and read_training_state(again)["state"]["step"] == 3
    assert load_run(again).config.train.spot_ratio_shrink == 0.5
    with pytest.raises(ConfigError, match="cannot resume"):
        train(parse_config({**cfg, "seed": 9}), resume=True)  # training settings still may not change
