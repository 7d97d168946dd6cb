"""Held-out squares of the training tissue (``data.holdout_fraction``): model selection without a val split.

On the real Xenium crop prepared with overlapping training tiles: every point of the tissue is held out
in all tiles covering it or in none; the training and validation views split the measured bins; a run with
the holdout validates on it and keeps its best checkpoint; the recipe's stage one uses it when the data
ask for it (off by default: interleaved squares select too late on the built-in crop).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from diffst.config import parse_config
from diffst.data.dataset import PreparedTiles
from diffst.data.holdout import BinHoldout, holdout_bins
from diffst.errors import InputError
from diffst.runs import BEST_DIR, find_checkpoint, read_training_state
from diffst.training import train
from diffst.training.data import open_datasets
from diffst.training.recipe import (
    STAGE_ONE_HOLDOUT,
    STAGE_ONE_STEPS,
    select_regression_length,
    stage_one_config,
)
from test_training import _config as tiny_config


def test_held_out_squares_agree_across_overlapping_tiles(prepared):
    tiles = PreparedTiles(prepared, "train")
    g = tiles.geometry
    held = holdout_bins(tiles.tiles, g, 0.25, seed=1)
    assert held.shape == (len(tiles), g.tile_hr, g.tile_hr) and held.dtype == bool
    # Map every bin to its absolute position: one answer per position, whatever tile covers it.
    seen: dict[tuple[int, int], bool] = {}
    for t, row in tiles.tiles.iterrows():
        for r in range(g.tile_hr):
            for c in range(g.tile_hr):
                key = (round(row["x0_um"] / g.hr_bin_um) + c, round(row["y0_um"] / g.hr_bin_um) + r)
                assert seen.setdefault(key, bool(held[t, r, c])) == bool(held[t, r, c])
    share = np.mean(list(seen.values()))
    assert 0.1 < share < 0.4  # a quarter of the squares, up to the draw on a small crop
    # Squares are one LR spot wide: bins in the same spot of the fixed grid agree.
    assert held.any() and not held.all()
    # Another seed draws other squares.
    assert (holdout_bins(tiles.tiles, g, 0.25, seed=2) != held).any()


def test_training_and_validation_views_split_the_measured_bins(prepared):
    full = PreparedTiles(prepared, "train")
    rest = PreparedTiles(prepared, "train", holdout=BinHoldout(0.25, 0, "rest"))
    held = PreparedTiles(prepared, "train", holdout=BinHoldout(0.25, 0, "held"))
    for i in range(len(full)):
        a, b, c = full[i]["hr_mask"], rest[i]["hr_mask"], held[i]["hr_mask"]
        assert not (b & c).any() and ((b | c) == a).all()
        assert (full[i]["hr"] == rest[i]["hr"]).all()  # the counts stay; only the mask changes
    with pytest.raises(ValueError, match="fraction"):
        BinHoldout(1.0)


def test_a_run_without_val_split_selects_on_the_held_out_squares(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path / "run", steps=8, val_every=2, keep_best=True, checkpoint_every=4)
    with pytest.raises(InputError, match="validation split"):
        train(parse_config(cfg))  # no val split and no holdout: nothing to select on
    cfg = tiny_config(prepared, tmp_path / "run2", steps=8, val_every=2, keep_best=True, checkpoint_every=4)
    cfg["data"]["holdout_fraction"] = 0.25
    parsed = parse_config(cfg)
    train_ds, val_ds, note = open_datasets(parsed)
    assert val_ds is not None and "25%" in note and train_ds.holdout.keep == "rest"
    run = train(parsed)
    with open(tmp_path / "run2" / "val.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    losses = {int(r["step"]): float(r["val_loss_ema"]) for r in rows}
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    best = find_checkpoint(run)
    assert best.parent.parent == run / BEST_DIR
    assert read_training_state(best)["state"]["step"] == min(losses, key=losses.get)


def test_a_regression_selects_its_length_on_held_out_squares_only_when_asked(prepared, tmp_path):
    assert STAGE_ONE_HOLDOUT == 0.0  # off by default (see diffst.training.recipe)
    first = select_regression_length(tiny_config(prepared, tmp_path / "r"), STAGE_ONE_STEPS, holdout=0.25)
    assert first["data"]["holdout_fraction"] == 0.25
    assert first["train"]["keep_best"] and first["train"]["patience"] > 0
    fixed = stage_one_config(tiny_config(prepared, tmp_path / "r"))
    assert fixed["train"]["steps"] == STAGE_ONE_STEPS and "keep_best" not in fixed["train"]
    assert "holdout_fraction" not in fixed["data"]
