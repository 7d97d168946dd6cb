"""Training: one :class:`Trainer` for every objective (diffusion, regression).

Data-parallel through Accelerate, with EMA and atomic resumable checkpoints.

Public API: :func:`train`, :class:`Trainer`, :func:`load_config` (re-exported from :mod:`diffst.config`).
Reading runs back (:func:`~diffst.runs.load_run`, :func:`~diffst.runs.load_checkpoint`,
:func:`~diffst.runs.read_training_state`, :func:`~diffst.runs.latest_checkpoint`) lives in
:mod:`diffst.runs`; those names are re-exported here for earlier callers.
"""

import importlib

# Loaded on first use (PEP 562), so that importing the package loads no torch: ``python -m diffst.training``
# must set OMP_WAIT_POLICY in its main() before torch (and its OpenMP runtime) is loaded.
_LAZY = {
    "train": "diffst.training.loop",
    "Trainer": "diffst.training.loop",
    "load_config": "diffst.config",
    "RunConfig": "diffst.config",
    "load_run": "diffst.runs",
    "load_checkpoint": "diffst.runs",
    "latest_checkpoint": "diffst.runs",
    "read_training_state": "diffst.runs",
    "train_two_stage": "diffst.training.recipe",
}

__all__ = ["train", "Trainer", "load_config", "RunConfig", "load_run", "load_checkpoint", "latest_checkpoint",
           "read_training_state", "train_two_stage"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
