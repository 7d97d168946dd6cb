"""Diff-ST's two-stage recipe (CorrDiff's split, Mardani et al. 2023, arXiv 2309.15214).

Stage one is a spot-ratio regression (``train.regression: spot_poisson``): the Diff-ST network, plus a
per-bin image head, says where inside each measured LR spot the spot's counts go; its answer is the point
estimate. Stage two is a diffusion of the residual over stage one (``diffusion.target:
regression_residual``): its samples give the spread and the intervals. Both stages share data, model
settings and seed; stage one is short, because on little training tissue a longer fit learns the training
tiles' transcripts by heart (held-out correlation falls after ~100-200 steps on the built-in example).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

__all__ = ["STAGE_ONE_STEPS", "stage_one_config", "stage_two_config", "train_two_stage"]

#: Training steps of stage one in the built-in recipe (batch 4: ~20 passes over the example's tiles).
STAGE_ONE_STEPS = 200


def _as_dict(config: Any) -> dict[str, Any]:
    """Return a run configuration as a mapping (a :class:`~diffst.config.RunConfig` dumped, a mapping copied)."""
    return config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))


def stage_one_config(config: Any, steps: int | None = STAGE_ONE_STEPS) -> dict[str, Any]:
    """Return the stage-one (regression) configuration of a two-stage run configuration, as a mapping.

    Parameters
    ----------
    config
        The run's configuration: a :class:`~diffst.config.RunConfig` or a mapping (a YAML file's content).
    steps
        Stage one's training steps; None keeps the configuration's own length.

    Returns
    -------
    dict
        A copy with ``run_dir`` ``<run_dir>-regression`` and the regression settings.
    """
    data = _as_dict(config)
    data["run_dir"] = f"{Path(data['run_dir'])}-regression"
    train = data.setdefault("train", {})
    train.update({"objective": "regression", "regression": "spot_poisson"})
    train.pop("base_run", None)
    if steps is not None:
        train.pop("epochs", None)
        train["steps"] = steps
        train["checkpoint_every"] = min(train.get("checkpoint_every", steps), steps)
    data.setdefault("diffusion", {}).pop("target", None)
    return data


def stage_two_config(config: Any, base_run: str | Path) -> dict[str, Any]:
    """Return the stage-two (residual diffusion) configuration, a mapping: ``config`` refining ``base_run``."""
    data = _as_dict(config)
    data.setdefault("diffusion", {})["target"] = "regression_residual"
    data.setdefault("train", {})["base_run"] = str(base_run)
    return data


def train_two_stage(config: Any, *, stage_one_steps: int | None = STAGE_ONE_STEPS,
                    name: str = "two-stage run") -> tuple[Path, Path]:
    """Train (or resume, or reuse) both stages; returns the folders of stage one and stage two.

    Parameters
    ----------
    config
        The run configuration (see :func:`stage_one_config`); its ``run_dir`` is stage two's.
    stage_one_steps
        Steps of stage one (None: the configuration's own length).
    name
        What error messages call the configuration.

    Returns
    -------
    tuple of Path
        ``(stage_one_run, stage_two_run)``.
    """
    from diffst.config import parse_config
    from diffst.runs import latest_checkpoint
    from diffst.training.loop import train

    first = parse_config(stage_one_config(config, stage_one_steps), name)
    base = train(first, resume=latest_checkpoint(first.run_dir) is not None)
    second = parse_config(stage_two_config(config, base), name)
    return base, train(second, resume=latest_checkpoint(second.run_dir) is not None)
