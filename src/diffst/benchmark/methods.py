"""The methods of the benchmark: training-free baselines, the histology ridge, and trained Diff-ST variants.

Every method maps a prepared fold (train split to learn from, test split to predict) to HR counts of the
test tiles, shape (tiles, genes, H, W).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("diffst.benchmark")

# Trained methods: run-config overrides on top of the budget's preset.
LEARNED: dict[str, dict[str, Any]] = {
    "diffst": {},
    "regression": {"train": {"objective": "regression"}},
    "diffst-no-cam": {"model": {"use_cam": False}},
    "diffst-no-graph": {"model": {"use_graph": False}},
    "diffst-no-hier": {"model": {"use_hierarchical": False}},
    # The paper's comparison methods: a diffusion baseline and four deterministic regressors.
    "guided-dm": {"model": {"arch": "guided_dm"}},
    "unet": {"model": {"arch": "unet"}, "train": {"objective": "regression"}},
    "unetpp": {"model": {"arch": "unetpp"}, "train": {"objective": "regression"}},
    "attention-unet": {"model": {"arch": "attention_unet"}, "train": {"objective": "regression"}},
    "histogene": {"model": {"arch": "histogene"}, "train": {"objective": "regression"}},
}
BASELINES = ("bicubic", "nearest", "ridge", "tesla")
METHODS = (*BASELINES, *LEARNED)
ABLATIONS = ("diffst", "diffst-no-cam", "diffst-no-graph", "diffst-no-hier")
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


def run_config(method: str, data_path: Path, run_dir: Path, budget: str, seed: int, device: str):
    """Build the :class:`~diffst.config.RunConfig` a trained method uses on one fold."""
    from diffst.config import parse_config

    data: dict[str, Any] = {"preset": BUDGETS[budget], "data": {"path": str(data_path), "example": None},
                            "run_dir": str(run_dir), "seed": seed, "device": device}
    for section, values in LEARNED[method].items():
        data[section] = dict(values)
    if budget == "full":
        data.setdefault("train", {})["val_every"] = 0  # folds have no val split
    return parse_config(data, f"benchmark method {method}")


def train_method(method: str, data_path: Path, run_dir: Path, budget: str, seed: int, device: str) -> Path:
    """Train (or resume, or reuse) a trained method's run on a fold's train split."""
    from diffst.training import train

    cfg = run_config(method, data_path, run_dir, budget, seed, device)
    resume = (run_dir / "checkpoints").is_dir()
    return train(cfg, resume=resume)


def predict_method(method: str, data_path: Path, *, run_dir: Path | None = None, budget: str = "tiny",
                   seed: int = 0, device: str = "cpu") -> np.ndarray:
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

    Returns
    -------
    np.ndarray
        Predicted counts per HR bin, float32.
    """
    from diffst.data.dataset import PreparedTiles

    test = PreparedTiles(data_path, "test")
    geom = test.geometry
    hr_shape = (geom.tile_hr, geom.tile_hr)
    lr, tissue = np.asarray(test.lr_counts), np.asarray(test.tissue)
    if method in ("bicubic", "nearest"):
        from diffst.baselines.interpolation import interpolate_lr

        return interpolate_lr(lr, hr_shape, geom.scale, mode=method)
    if method == "tesla":
        from diffst.baselines.tesla import tesla_like

        return tesla_like(lr, tissue, hr_shape, geom.scale)
    if method == "ridge":
        from diffst.baselines.ridge import HistologyRidge

        train = PreparedTiles(data_path, "train")
        model = HistologyRidge().fit(np.asarray(train.lr_counts), np.asarray(train.tissue),
                                     np.asarray(train.hr_counts), geom.scale)
        return model.predict(lr, tissue, hr_shape, geom.scale)
    if method in LEARNED:
        if run_dir is None:
            raise ValueError(f"method {method} needs a run folder")
        from diffst.inference.predict import predict_checkpoint

        train_method(method, data_path, run_dir, budget, seed, device)
        _, preds, _ = predict_checkpoint(run_dir, data_path, split="test", device=device, seed=seed, progress=False)
        return np.asarray(preds.mean, dtype=np.float32)
    raise ValueError(f"unknown method {method}")
