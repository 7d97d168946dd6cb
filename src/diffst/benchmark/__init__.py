"""Region k-fold cross-validated benchmark of Diff-ST against baselines (``diffst benchmark``).

:func:`~diffst.benchmark.run.run_benchmark` prepares one dataset per (scale, fold) with a held-out
rectangle (:mod:`diffst.benchmark.folds`), runs every method on it (:mod:`diffst.benchmark.methods`),
stores each (scale, fold, method) result as a JSON cell, and summarises them into ``benchmark.json``,
``benchmark.md`` and figures (:mod:`diffst.benchmark.report`).
"""

from diffst.benchmark.folds import Fold, grid_regions, make_folds
from diffst.benchmark.methods import ABLATIONS, BUDGETS, METHODS
from diffst.benchmark.run import run_benchmark

__all__ = ["ABLATIONS", "BUDGETS", "METHODS", "Fold", "grid_regions", "make_folds", "run_benchmark"]
