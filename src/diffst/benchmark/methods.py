"""The methods of the benchmark: training-free baselines, the paper's trained baselines, Diff-ST, its ablations.

Every method maps a prepared fold (train split to learn from, test split to predict) to HR counts of the
test tiles, shape (tiles, genes, H, W). Trained methods predict as ``diffst predict`` does by default: their
answers are spot-consistent (``sampler.spot_consistent``); ``+spots`` gives a baseline the same projection.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("diffst.benchmark")

# Trained methods of one run: run-config overrides on top of the budget's preset.
LEARNED: dict[str, dict[str, Any]] = {
    # Diff-ST's stage one alone: the spot-ratio regression (diffst.training.recipe); the point estimate of
    # every two-stage method is its stage one's, so these are the cheap ablations of that answer.
    "regression": {"train": {"objective": "regression", "regression": "spot_poisson"}},
    # One member of that ensemble alone (the run of seed ``seed``, shared): what the seed ensemble adds.
    "regression-one-seed": {"train": {"objective": "regression", "regression": "spot_poisson"}},
    "regression-no-cam": {"model": {"use_cam": False}, "train": {"objective": "regression", "regression": "spot_poisson"}},
    "regression-no-graph": {"model": {"use_graph": False},
                            "train": {"objective": "regression", "regression": "spot_poisson"}},
    "regression-no-hier": {"model": {"use_hierarchical": False},
                           "train": {"objective": "regression", "regression": "spot_poisson"}},
    "regression-mse": {"train": {"objective": "regression", "regression": "mse"}},  # no spot-ratio output
    # Stage one started from the closed-form histology ridge (train.linear_prior).
    "regression-linear-prior": {"train": {"objective": "regression", "regression": "spot_poisson",
                                          "linear_prior": True}},
    # The paper's single-stage Diff-ST (diffusion of the residual over interpolated LR, x0-probe answer).
    "diffst-one-stage": {},
    # The paper's comparison methods: a diffusion baseline and four deterministic regressors.
    "guided-dm": {"model": {"arch": "guided_dm"}},
    "unet": {"model": {"arch": "unet"}, "train": {"objective": "regression"}},
    "unetpp": {"model": {"arch": "unetpp"}, "train": {"objective": "regression"}},
    "attention-unet": {"model": {"arch": "attention_unet"}, "train": {"objective": "regression"}},
    "histogene": {"model": {"arch": "histogene"}, "train": {"objective": "regression"}},
}
# Two-stage methods (Diff-ST and its ablations): model overrides of both stages. Stage one is the
# spot-ratio regression (run folder ``regression<suffix>-...``, shared with the ``regression`` method),
# stage two a diffusion of its residual; the answer is stage one's, the samples' spread stage two's.
TWO_STAGE: dict[str, dict[str, Any]] = {
    "diffst": {},
    "diffst-no-cam": {"use_cam": False},
    "diffst-no-graph": {"use_graph": False},
    "diffst-no-hier": {"use_hierarchical": False},
}
# Stage-one methods are seed ensembles (diffst.training.recipe): ``members`` runs of seeds seed, seed + 1, ...,
# run folders ``<regression method>-<budget>-seed<seed + k>``, answers averaged in counts.
ENSEMBLED = ("regression", "regression-no-cam", "regression-no-graph", "regression-no-hier", "regression-mse",
             "regression-linear-prior", *TWO_STAGE)
# Training-free baselines; "+spots": the same output made spot-consistent (project_to_spots).
BASELINES = ("bicubic", "nearest", "ridge", "tesla", "bicubic+spots", "ridge+spots", "tesla+spots")
TRAINED = (*LEARNED, *TWO_STAGE)
# The methods Diff-ST is compared against (Table 1's competitors), and Diff-ST's own answers: the two-stage
# run's point estimate, or its stage one alone (the same answer when stage two was not trained).
COMPETITORS = (*BASELINES, "unet", "unetpp", "attention-unet", "histogene", "guided-dm")
DIFFST_ANSWERS = ("diffst", "regression")
METHODS = (*BASELINES, *TRAINED)
ABLATIONS = (*TWO_STAGE, "regression", "regression-one-seed", "regression-no-cam", "regression-no-graph", "regression-no-hier",
             "regression-mse", "regression-linear-prior")
#: Samples drawn per test tile by the sampling methods (their intervals' and spread's source).
INTERVAL_SAMPLES = 4
# Budget -> run preset of the trained methods (tiny: a few steps, for CI and tests; full: the cpu preset).
BUDGETS = {"tiny": "tiny", "full": "cpu"}


def parse_methods(text: str) -> list[str]:
    """Split a comma-separated method list, checking every name; order kept, repeats dropped."""
    from diffst.errors import InputError

    names = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InputError(f"Unknown method(s) {unknown or [text]}; choose from {', '.join(METHODS)}.")
    return names


def run_config_dict(method: str, data_path: Path, run_dir: Path, budget: str, seed: int, device: str) -> dict[str, Any]:
    """Return the run configuration (a mapping) of a trained method on one fold (two-stage: stage two's)."""
    from diffst.training.recipe import select_regression_length

    # Diffusion runs train their preset's length; only regressions select theirs on the fold's validation
    # region (when it has one), exactly as Diff-ST's stage one does.
    data: dict[str, Any] = {"preset": BUDGETS[budget], "data": {"path": str(data_path), "example": None},
                            "run_dir": str(run_dir), "seed": seed, "device": device, "train": {"val_every": 0}}
    if method in LEARNED:
        for section, values in LEARNED[method].items():
            data.setdefault(section, {}).update(values)
    else:
        data["model"] = dict(TWO_STAGE[method])
    steps = stage_one_steps(budget)
    if data["train"].get("objective") == "regression" and steps is not None:
        select_regression_length(data, steps)
    return data


def stage_one_steps(budget: str) -> int | None:
    """Return the steps of regression runs and of stage one (None: the budget preset's)."""
    from diffst.training.recipe import STAGE_ONE_STEPS

    return STAGE_ONE_STEPS if budget == "full" else None


def stage_one_method(method: str) -> str | None:
    """Return the regression method whose runs are ``method``'s stage one (None for other methods).

    A two-stage method's stage one is its ``regression`` twin (``diffst-no-cam`` -> ``regression-no-cam``: the
    same run configuration), and ``regression-one-seed`` is ``regression``'s first member.
    """
    if method in TWO_STAGE:
        return f"regression{method[len('diffst'):]}"
    if method == "regression-one-seed":
        return "regression"
    return method if method in ENSEMBLED else None


def member_run_dirs(method: str, run_dir: Path, budget: str, seed: int, members: int) -> list[Path]:
    """Run folders of a stage-one method's regression runs (a two-stage method's stage one), beside ``run_dir``.

    Member k is ``<regression method>-<budget>-seed<seed + k>``, so ensembles of other sizes and seeds share
    runs: ``diffst`` shares ``regression``'s, and ``regression-one-seed`` is ``regression``'s first member.
    """
    count = 1 if method == "regression-one-seed" else members
    return [run_dir.parent / f"{stage_one_method(method)}-{budget}-seed{seed + k}" for k in range(count)]


def run_config(method: str, data_path: Path, run_dir: Path, budget: str, seed: int, device: str):
    """Build the :class:`~diffst.config.RunConfig` of a trained method on one fold (two-stage: stage two's)."""
    from diffst.config import parse_config

    data = run_config_dict(method, data_path, run_dir, budget, seed, device)
    return parse_config(data, f"benchmark method {method}")


def train_method(method: str, data_path: Path, run_dir: Path, budget: str, seed: int, device: str,
                 members: int = 1) -> list[Path]:
    """Train (or resume, or reuse) a trained method's run(s) on a fold's train split; returns the runs to predict.

    A stage-one method (:data:`ENSEMBLED`) trains ``members`` regression runs and returns them all (their
    answers are averaged); a two-stage method trains them as its stage one, then its stage two, and returns
    that; other methods train and return their one run.
    """
    from diffst.config import parse_config
    from diffst.runs import latest_checkpoint
    from diffst.training import train
    from diffst.training.recipe import stage_two_config

    name = f"benchmark method {method}"
    regression = stage_one_method(method)
    if regression is None:
        data = run_config_dict(method, data_path, run_dir, budget, seed, device)
        return [train(parse_config(data, name), resume=latest_checkpoint(run_dir) is not None)]
    runs = [train(parse_config(run_config_dict(regression, data_path, folder, budget, seed + k, device), name),
                  resume=latest_checkpoint(folder) is not None)
            for k, folder in enumerate(member_run_dirs(method, run_dir, budget, seed, members))]
    if method not in TWO_STAGE:
        return runs
    data = stage_two_config(run_config_dict(method, data_path, run_dir, budget, seed, device),
                            runs if len(runs) > 1 else runs[0])
    return [train(parse_config(data, name), resume=latest_checkpoint(run_dir) is not None)]


def predict_method(method: str, data_path: Path, *, run_dir: Path | None = None, budget: str = "tiny",
                   seed: int = 0, device: str = "cpu", samples: bool = False, members: int = 1):
    """HR counts of the test tiles of ``data_path`` predicted by ``method``, shape (T, N, H, W).

    Parameters
    ----------
    method
        A name from :data:`METHODS`.
    data_path
        A prepared fold (train and test splits).
    run_dir
        Run folder of a trained method (reused and resumed when it exists).
    budget, seed, device
        Training budget (:data:`BUDGETS`), seed and device of trained methods.
    members
        Seed-ensemble size of stage-one methods (:data:`ENSEMBLED`); others ignore it.
    samples
        Also return the K sampled count maps of sampling methods, (K, T, N, H, W), or None for others.

    Returns
    -------
    np.ndarray or tuple
        Predicted counts per HR bin, float32 (with ``samples``: ``(counts, sampled counts or None)``).
    """
    counts, drawn = _predict(method, data_path, run_dir, budget, seed, device, members)
    return (counts, drawn) if samples else counts


def _predict(method: str, data_path: Path, run_dir: Path | None, budget: str, seed: int,
             device: str, members: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    from diffst.data.dataset import PreparedTiles

    test = PreparedTiles(data_path, "test")
    geom = test.geometry
    hr_shape = (geom.tile_hr, geom.tile_hr)
    lr, tissue = np.asarray(test.lr_counts), np.asarray(test.tissue)
    if method.endswith("+spots"):
        from diffst.core.spots import project_to_spots

        raw = predict_method(method.removesuffix("+spots"), data_path)
        return project_to_spots(np.clip(raw, 0, None), lr, geom.scale, np.asarray(test.lr_mask, bool)), None
    if method in ("bicubic", "nearest"):
        from diffst.baselines.interpolation import interpolate_lr

        return interpolate_lr(lr, hr_shape, geom.scale, mode=method), None
    if method == "tesla":
        from diffst.baselines.tesla import tesla_like

        return tesla_like(lr, tissue, hr_shape, geom.scale), None
    if method == "ridge":
        from diffst.baselines.ridge import HistologyRidge
        from diffst.evaluation.report import scoring_mask

        train = PreparedTiles(data_path, "train")
        model = HistologyRidge().fit(np.asarray(train.lr_counts), np.asarray(train.tissue),
                                     np.asarray(train.hr_counts), geom.scale, mask=scoring_mask(train))
        return model.predict(lr, tissue, hr_shape, geom.scale), None
    if method in TRAINED:
        if run_dir is None:
            raise ValueError(f"method {method} needs a run folder")
        from diffst.inference.predict import predict_checkpoint
        from diffst.runs import load_base_run, load_run

        runs = train_method(method, data_path, run_dir, budget, seed, device, members)
        # Several runs are a seed ensemble of regressions (averaged as a two-stage run's base is).
        loaded = load_base_run(runs, device) if len(runs) > 1 else load_run(runs[0], device=device)
        sampling = loaded.config.train.objective == "diffusion"
        # Sampling methods draw INTERVAL_SAMPLES samples: their spread gives the intervals the benchmark scores.
        _, preds, _ = predict_checkpoint(runs[0], data_path, split="test", device=device, seed=seed, progress=False,
                                         run=loaded, sampler={"num_samples": INTERVAL_SAMPLES} if sampling else None)
        drawn = np.asarray(test.normaliser.to_counts(preds.samples_model), dtype=np.float32) if sampling else None
        return np.asarray(preds.mean, dtype=np.float32), drawn
    raise ValueError(f"unknown method {method}")
