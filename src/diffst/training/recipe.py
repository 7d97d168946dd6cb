"""Diff-ST's two-stage recipe (CorrDiff's split, Mardani et al. 2023, arXiv 2309.15214).

Stage one is a spot-ratio regression (``train.regression: spot_poisson``): the Diff-ST network, plus a
per-bin image head, says where inside each measured LR spot the spot's counts go; its answer is the point
estimate. Stage two is a diffusion of the residual over stage one (``diffusion.target:
regression_residual``): its samples give the spread and the intervals. Both stages share data and model
settings. Stage one is a seed ensemble: :data:`STAGE_ONE_MEMBERS` regressions trained alike with seeds
``seed``, ``seed + 1``, ..., whose answers are averaged in counts (on the built-in example's region folds
four seeds answer with PCC spread over ±0.01-0.02 and their mean beats all but the luckiest; see the README's
benchmarks). On little training tissue a long stage one learns the training tiles' transcripts by
heart (held-out correlation falls after ~100-200 steps on the built-in example), so its length is chosen
on held-out tissue when the prepared data has a validation split (``diffst prepare --val-region``): it
trains up to :data:`STAGE_ONE_MAX_STEPS`, validates every :data:`STAGE_ONE_VAL_EVERY` steps, keeps the
checkpoint of lowest validation deviance and stops after :data:`STAGE_ONE_PATIENCE` passes without a lower
one. Without a validation split it trains :data:`STAGE_ONE_STEPS` steps, or, with a held-out share of its
training tissue (``holdout`` of :func:`select_regression_length`, :mod:`diffst.data.holdout`), selects its
length the same way on those squares.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

__all__ = ["STAGE_ONE_HOLDOUT", "STAGE_ONE_MAX_STEPS", "STAGE_ONE_MEMBERS", "STAGE_ONE_PATIENCE", "STAGE_ONE_STEPS", "STAGE_ONE_VAL_EVERY",
           "has_validation_split", "regression_schedule", "select_regression_length", "stage_one_config",
           "stage_two_config", "train_stage_one", "train_two_stage"]

log = logging.getLogger("diffst.training")

#: Members of stage one's seed ensemble (each a regression run of its own, about a minute on 2 CPU cores).
STAGE_ONE_MEMBERS = 4
#: Training steps of stage one without a validation split (batch 4: ~20 passes over the example's tiles).
STAGE_ONE_STEPS = 200
#: With a validation split: at most this many steps, validation every STAGE_ONE_VAL_EVERY steps, early
#: stop after STAGE_ONE_PATIENCE passes without a lower validation deviance.
STAGE_ONE_MAX_STEPS = 2000
STAGE_ONE_VAL_EVERY = 25
STAGE_ONE_PATIENCE = 8
#: Without a validation split: the share of the training tissue held out to select the length on. Off:
#: measured on the built-in crop (s = 5, fold 1), squares interleaved with the training tissue keep
#: improving long after held-out regions have started to get worse (selected step 250, region PCC 0.488
#: vs 0.541 after the fixed 200 steps and 0.569 at step 75): they share the training region's own patterns.
STAGE_ONE_HOLDOUT = 0.0


def regression_schedule(steps: int, validation: bool, checkpoint_every: int | None = None) -> dict[str, Any]:
    """Return the ``train`` settings of a regression's length: ``steps``, or early stopping on validation.

    Parameters
    ----------
    steps
        Length without a validation split.
    validation
        Whether the data has a validation split (then: up to :data:`STAGE_ONE_MAX_STEPS`, keep the best).
    checkpoint_every
        The configuration's own checkpoint interval (capped at the length).
    """
    if validation:
        return {"steps": STAGE_ONE_MAX_STEPS, "val_every": STAGE_ONE_VAL_EVERY, "keep_best": True,
                "patience": STAGE_ONE_PATIENCE, "checkpoint_every": STAGE_ONE_VAL_EVERY * STAGE_ONE_PATIENCE}
    return {"steps": steps, "checkpoint_every": min(checkpoint_every or steps, steps)}


def select_regression_length(data: dict[str, Any], steps: int, holdout: float = STAGE_ONE_HOLDOUT) -> dict[str, Any]:
    """Set a regression's length in a run-configuration mapping (changed in place and returned).

    With a validation split, or else with ``holdout`` > 0 (``data.holdout_fraction``: that share of the
    training tissue held out), early stopping on the validation deviance (:func:`regression_schedule`);
    otherwise ``steps`` steps.
    """
    train = data.setdefault("train", {})
    validation = has_validation_split(data)
    if not validation and holdout > 0 and data.get("data", {}).get("val_split", "val") is not None:
        data.setdefault("data", {})["holdout_fraction"] = float(holdout)
        validation = True
    train.update(regression_schedule(steps, validation, train.get("checkpoint_every")))
    return data


def has_validation_split(config: Any) -> bool:
    """Tell whether the prepared dataset of a run configuration has tiles in its validation split."""
    from diffst.data.prepare import is_prepared_dataset, load_meta

    data = _as_dict(config).get("data", {})
    split, path = data.get("val_split", "val"), data.get("path")
    if split is None or path is None or not is_prepared_dataset(Path(path)):
        return False
    return bool(load_meta(path).get("n_tiles", {}).get(split))


def _as_dict(config: Any) -> dict[str, Any]:
    """Return a run configuration as a mapping (a :class:`~diffst.config.RunConfig` dumped, a mapping copied)."""
    return config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))


def stage_one_config(config: Any, steps: int | None = STAGE_ONE_STEPS, member: int = 0) -> dict[str, Any]:
    """Return the configuration of one stage-one (regression) member of a two-stage run configuration.

    Parameters
    ----------
    config
        The run's configuration: a :class:`~diffst.config.RunConfig` or a mapping (a YAML file's content).
    steps
        Stage one's training steps without a validation split (with one: early stopping, see the module);
        None keeps the configuration's own length.
    member
        Which member of the seed ensemble: seed ``seed + member``; run folder ``<run_dir>-regression`` for
        member 0, ``<run_dir>-regression-member<k>`` for the others.

    Returns
    -------
    dict
        A copy with that run folder and seed and the regression settings.
    """
    data = _as_dict(config)
    data["run_dir"] = f"{Path(data['run_dir'])}-regression" + (f"-member{member}" if member else "")
    data["seed"] = int(data.get("seed", 0)) + int(member)
    train = data.setdefault("train", {})
    train.update({"objective": "regression", "regression": "spot_poisson"})
    train.pop("base_run", None)
    if steps is not None:
        train.pop("epochs", None)
        select_regression_length(data, steps)
    data.setdefault("diffusion", {}).pop("target", None)
    return data


def stage_two_config(config: Any, base_run: str | Path | list[str | Path]) -> dict[str, Any]:
    """Return the stage-two (residual diffusion) configuration, a mapping: ``config`` refining ``base_run``.

    ``base_run``: one regression run, or the runs of a seed ensemble (a list).
    """
    data = _as_dict(config)
    data.setdefault("diffusion", {})["target"] = "regression_residual"
    base = [str(p) for p in base_run] if isinstance(base_run, (list, tuple)) else str(base_run)
    data.setdefault("train", {})["base_run"] = base
    return data


def train_stage_one(config: Any, *, steps: int | None = STAGE_ONE_STEPS, members: int = STAGE_ONE_MEMBERS,
                    name: str = "two-stage run") -> list[Path]:
    """Train (or resume, or reuse) the members of stage one's seed ensemble; returns their run folders.

    Parameters
    ----------
    config
        The run configuration (see :func:`stage_one_config`).
    steps
        Steps of each member (None: the configuration's own length).
    members
        Size of the ensemble (1: a single regression run).
    name
        What error messages call the configuration.
    """
    from diffst.config import parse_config
    from diffst.errors import InputError
    from diffst.runs import latest_checkpoint
    from diffst.training.loop import train

    if members < 1:
        raise InputError(f"stage one needs at least one member (got {members}); use 1 for a single regression run")
    runs = []
    for member in range(members):
        cfg = parse_config(stage_one_config(config, steps, member), name)
        log.info("stage one, member %d of %d (seed %d): %s", member + 1, members, cfg.seed, cfg.run_dir)
        runs.append(train(cfg, resume=latest_checkpoint(cfg.run_dir) is not None))
    return runs


def train_two_stage(config: Any, *, stage_one_steps: int | None = STAGE_ONE_STEPS,
                    stage_one_members: int = STAGE_ONE_MEMBERS, name: str = "two-stage run") -> tuple[list[Path], Path]:
    """Train (or resume, or reuse) both stages; returns the folders of stage one's members and of stage two.

    Parameters
    ----------
    config
        The run configuration (see :func:`stage_one_config`); its ``run_dir`` is stage two's.
    stage_one_steps
        Steps of stage one (None: the configuration's own length).
    stage_one_members
        Members of stage one's seed ensemble (:data:`STAGE_ONE_MEMBERS`; 1: a single regression run).
    name
        What error messages call the configuration.

    Returns
    -------
    tuple
        ``(stage_one_runs, stage_two_run)``.
    """
    from diffst.config import parse_config
    from diffst.runs import latest_checkpoint
    from diffst.training.loop import train

    bases = train_stage_one(config, steps=stage_one_steps, members=stage_one_members, name=name)
    second = parse_config(stage_two_config(config, bases if len(bases) > 1 else bases[0]), name)
    return bases, train(second, resume=latest_checkpoint(second.run_dir) is not None)
