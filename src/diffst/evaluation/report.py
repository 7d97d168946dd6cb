"""Evaluation of a predicted split against its HR ground truth.

Always beside the interpolation baseline and (for point data) the noise ceiling, on the same tiles.
"""

from __future__ import annotations

import numpy as np

from diffst.baselines import interpolate_lr
from diffst.evaluation.metrics import evaluate_maps, per_gene_pcc


def evaluate_split(dataset, predictions: dict[str, np.ndarray]) -> dict[str, dict]:
    """Metrics of each named prediction (T, N, H, W counts) plus bicubic interpolation of LR.

    Returns ``{method: metrics}`` (see :func:`evaluate_maps`), each with ``per_gene_pcc`` as a dict.
    """
    if not dataset.has_hr:
        raise ValueError("This split has no HR ground truth (spot data); nothing to evaluate against.")
    truth = np.asarray(dataset.hr_counts)
    geom = dataset.geometry
    methods = {"bicubic": interpolate_lr(np.asarray(dataset.lr_counts), (geom.tile_hr, geom.tile_hr), geom.scale)}
    methods.update(predictions)
    out = {}
    for name, pred in methods.items():
        metrics = evaluate_maps(pred, truth, dataset.normaliser)
        metrics["per_gene_pcc"] = dict(zip(dataset.genes, np.round(per_gene_pcc(pred, truth), 4).tolist(), strict=True))
        out[name] = metrics
    return out
