"""Model selection on a validation region (``train.keep_best``, ``train.patience``) and the recipe's use of it.

A run with a validation split keeps the checkpoint of lowest validation loss under ``best/``; its run folder
then stands for that checkpoint; with ``patience`` it stops early, and the stop survives a resume. Stage one
of the two-stage recipe selects its length this way when the data has a validation split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from diffst.config import ConfigError, parse_config
from diffst.core.geometry import TileGeometry
from diffst.errors import InputError
from diffst.runs import BEST_DIR, find_checkpoint, latest_checkpoint, list_checkpoints, read_training_state
from diffst.training import train
from diffst.training.recipe import STAGE_ONE_STEPS, has_validation_split, stage_one_config
from test_training import _config as tiny_config

# 100 µm tiles (10 x 10 HR bins of 10 µm, s = 5): the example crop then has room for a validation region
# beside its test region and the training tiles.
SMALL_TILES = TileGeometry(hr_bin_um=10.0, scale=5, tile_lr=2, image_pixel_um=0.5, tissue_px=64, cell_grid=4,
                           cell_px=16)
VAL_REGION = (1062.0, 494.5, 1162.0, 594.5)


@pytest.fixture(scope="module")
def prepared_with_val(tmp_path_factory) -> Path:
    from diffst.data.prepare import SplitSpec, load_meta, prepare_dataset
    from diffst.example import EXAMPLE_TEST_REGION, load_example

    out = tmp_path_factory.mktemp("selection") / "prep"
    prepare_dataset([load_example()], out, SMALL_TILES, n_genes=6,
                    split=SplitSpec(test_region=EXAMPLE_TEST_REGION, val_region=VAL_REGION, train_stride_um=50),
                    progress=False, preview=False)
    n = load_meta(out)["n_tiles"]
    assert n["train"] and n["val"] and n["test"]
    return out


def _val_rows(run: Path) -> list[dict]:
    with open(run / "val.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_keep_best_keeps_the_lowest_validation_loss_and_stops_early(prepared_with_val, tmp_path, one_thread):
    cfg = tiny_config(prepared_with_val, tmp_path / "run", steps=60, objective="regression",
                      regression="spot_poisson", lr=0.3, val_every=3, keep_best=True, patience=2,
                      checkpoint_every=6)
    run = train(parse_config(cfg))
    rows = _val_rows(run)
    losses = {int(r["step"]): float(r["val_loss_ema"]) for r in rows}
    best_step = min(losses, key=losses.get)
    best = find_checkpoint(run)
    assert best.parent.parent == run / BEST_DIR and read_training_state(best)["state"]["step"] == best_step
    final = read_training_state(latest_checkpoint(run))["state"]
    # Stopped early: two validations without a lower loss right after the best one, short of 60 steps.
    assert final["stopped_early"] and final["step"] < 60 and final["step"] == max(losses)
    assert sorted(losses)[-3] == best_step and final["best"]["step"] == best_step
    # Resuming an early-stopped run trains no further.
    steps_before = [s for s, _ in list_checkpoints(run)]
    train(parse_config(cfg), resume=True)
    assert [s for s, _ in list_checkpoints(run)] == steps_before and len(_val_rows(run)) == len(rows)


def test_keep_best_needs_a_validation_split_and_val_every(prepared, tmp_path):
    with pytest.raises(ConfigError, match="val_every"):
        parse_config(tiny_config(prepared, tmp_path / "a", keep_best=True, val_every=0))
    with pytest.raises(ConfigError, match="keep_best"):
        parse_config(tiny_config(prepared, tmp_path / "b", patience=3))
    with pytest.raises(InputError, match="validation split"):
        train(parse_config(tiny_config(prepared, tmp_path / "c", keep_best=True, val_every=2)))


def test_stage_one_selects_its_length_only_with_a_validation_split(prepared, prepared_with_val, tmp_path):
    assert has_validation_split({"data": {"path": str(prepared_with_val)}})
    assert not has_validation_split({"data": {"path": str(prepared)}})
    assert not has_validation_split({"data": {"path": str(prepared_with_val), "val_split": None}})
    with_val = stage_one_config(tiny_config(prepared_with_val, tmp_path / "r"))["train"]
    assert with_val["keep_best"] and with_val["patience"] > 0 and with_val["steps"] > STAGE_ONE_STEPS
    without = stage_one_config(tiny_config(prepared, tmp_path / "r"))["train"]
    assert "keep_best" not in without and without["steps"] == STAGE_ONE_STEPS


def test_benchmark_folds_validate_on_the_farthest_cell_when_tissue_allows(tmp_path):
    from diffst.benchmark.folds import make_folds
    from diffst.benchmark.run import MIN_TRAIN_TILE_AREAS, _prepare_fold
    from diffst.core.geometry import tile_preset
    from diffst.data.prepare import load_meta
    from diffst.example import load_example

    sample = load_example()
    genes = sample.genes[:4]
    fold = make_folds([sample], SMALL_TILES, 4, "grid")[0]
    far = make_folds([sample], SMALL_TILES, 4, "grid")[3]
    assert fold.val_region == far.region  # 2 x 2 grid: the diagonal cell
    status = _prepare_fold([sample], fold, SMALL_TILES, tmp_path / "small", genes, 20.0, 0.5)
    assert status["status"] == "ok" and status["val_region"] == list(far.region)
    assert status["n_val_tiles"] > 0 and status["train_tile_areas"] >= MIN_TRAIN_TILE_AREAS
    assert load_meta(tmp_path / "small")["n_tiles"]["val"] == status["n_val_tiles"]
    # 200 µm tiles: too little tissue is left beside two held-out cells, so the fold trains without validation.
    cpu = tile_preset("cpu", 10)
    fold = make_folds([sample], cpu, 4, "grid")[0]
    status = _prepare_fold([sample], fold, cpu, tmp_path / "cpu", genes, 20.0, 0.5)
    assert status["status"] == "ok" and status["val_region"] is None and status["validation"].startswith("none")
    assert not load_meta(tmp_path / "cpu")["n_tiles"].get("val")
