"""Evaluation of a predicted split against its HR ground truth.

Always beside the interpolation baseline and (for point data) the noise ceiling, on the same tiles.
Splits with unmeasured HR bins (spot-only slides prepared in the self-supervised mode, where HR bins
without a spot hold no ground truth) are scored on the measured bins only (:func:`evaluate_masked_maps`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np

from diffst.baselines import interpolate_lr
from diffst.evaluation.metrics import evaluate_maps, per_gene_pcc, ssim_per_map

__all__ = ["evaluate_split", "evaluate_masked_maps", "masked_pearson_per_map", "scoring_mask"]


def evaluate_split(dataset, predictions: dict[str, np.ndarray]) -> dict[str, dict]:
    """Metrics of each named prediction (T, N, H, W counts) plus bicubic interpolation of LR.

    Returns ``{method: metrics}`` (see :func:`evaluate_maps`), each with ``per_gene_pcc`` as a dict. When the
    split has unmeasured HR bins (``dataset.hr_mask`` False somewhere), every metric is computed over the
    measured bins only (:func:`evaluate_masked_maps`).
    """
    if not dataset.has_hr:
        raise ValueError("This split has no HR ground truth (spot data); nothing to evaluate against.")
    truth = np.asarray(dataset.hr_counts)
    mask = getattr(dataset, "hr_mask", None)
    mask = None if mask is None or np.asarray(mask).all() else np.asarray(mask, dtype=bool)
    geom = dataset.geometry
    methods = {"bicubic": interpolate_lr(np.asarray(dataset.lr_counts), (geom.tile_hr, geom.tile_hr), geom.scale)}
    methods.update(predictions)
    out = {}
    for name, pred in methods.items():
        if mask is None:
            metrics = evaluate_maps(pred, truth, dataset.normaliser)
            gene_r = per_gene_pcc(pred, truth)
        else:
            metrics = evaluate_masked_maps(pred, truth, mask, dataset.normaliser)
            with np.errstate(invalid="ignore"), _quiet_nanmean():
                gene_r = np.nanmean(masked_pearson_per_map(np.asarray(pred), truth, mask[:, None]), axis=0)
        metrics["per_gene_pcc"] = dict(zip(dataset.genes, np.round(gene_r, 4).tolist(), strict=True))
        out[name] = metrics
    return out


def masked_pearson_per_map(pred: np.ndarray, true: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Signed Pearson r of matching maps over their last two axes, on the bins where ``mask`` is True.

    Parameters
    ----------
    pred, true
        (..., H, W) maps.
    mask
        Boolean mask broadcastable to them (e.g. (T, 1, H, W) for (T, N, H, W) maps).

    Returns
    -------
    np.ndarray
        r per map (shape ``pred.shape[:-2]``); NaN where a map is constant on its measured bins or has fewer
        than two of them.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    w = np.broadcast_to(np.asarray(mask, dtype=bool), p.shape).astype(np.float64)
    n = w.sum(axis=(-2, -1), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        pc = (p - (w * p).sum(axis=(-2, -1), keepdims=True) / n) * w
        tc = (t - (w * t).sum(axis=(-2, -1), keepdims=True) / n) * w
        denom = np.sqrt((pc * pc).sum(axis=(-2, -1)) * (tc * tc).sum(axis=(-2, -1)))
        r = np.where(denom > 0, (pc * tc).sum(axis=(-2, -1)) / denom, np.nan)
    return np.where(n[..., 0, 0] >= 2, r, np.nan)


def evaluate_masked_maps(pred_counts: np.ndarray, true_counts: np.ndarray, hr_mask: np.ndarray,
                         normaliser=None) -> dict[str, float]:
    """Compute the metrics of :func:`~diffst.evaluation.metrics.evaluate_maps` on the measured HR bins only.

    Parameters
    ----------
    pred_counts, true_counts
        (T, N, H, W) predicted and observed counts per HR bin.
    hr_mask
        (T, H, W) bool, the measured bins (True) of each tile.
    normaliser
        For ``rmse_model`` (optional).

    Returns
    -------
    dict
        ``pcc`` (per tile and gene over measured bins, averaged), ``pcc_pooled``, ``rmse_counts``,
        ``mae_counts``, ``paper_rmse`` / ``paper_abs_pcc`` (min-max over measured bins), ``ssim`` (on the
        fully measured tiles only; NaN when there are none), ``rmse_model`` (with a normaliser) and
        ``measured_fraction`` (of all HR bins). Error metrics are NaN when no bin is measured.
    """
    pred = np.asarray(pred_counts, dtype=np.float64)
    true = np.asarray(true_counts, dtype=np.float64)
    mask = np.asarray(hr_mask, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"Prediction shape {pred.shape} differs from ground truth {true.shape}.")
    if mask.shape != (pred.shape[0], *pred.shape[-2:]):
        raise ValueError(f"HR mask shape {mask.shape} does not match maps {pred.shape} (expected (T, H, W)).")
    per_map = mask[:, None]
    full = np.broadcast_to(per_map, pred.shape)
    p, t = pred[full], true[full]  # measured bins of every tile and gene
    r = masked_pearson_per_map(pred, true, per_map)
    pooled = masked_pearson_per_map(np.moveaxis(pred, 1, 0).reshape(pred.shape[1], 1, -1),
                                    np.moveaxis(true, 1, 0).reshape(true.shape[1], 1, -1),
                                    np.moveaxis(full, 1, 0).reshape(pred.shape[1], 1, -1))

    def minmax(x: np.ndarray) -> np.ndarray:
        lo = np.where(full, x, np.inf).min(axis=(-2, -1), keepdims=True)
        hi = np.where(full, x, -np.inf).max(axis=(-2, -1), keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        return np.where(hi > lo, (x - np.where(np.isfinite(lo), lo, 0.0)) / span, 0.0)

    whole = mask.all(axis=(-2, -1))
    empty = p.size == 0
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        out = {
            "pcc": float(np.nanmean(r)),
            "pcc_pooled": float(np.nanmean(pooled)),
            "rmse_counts": float("nan") if empty else float(np.sqrt(np.mean((p - t) ** 2))),
            "mae_counts": float("nan") if empty else float(np.mean(np.abs(p - t))),
            "ssim": float(np.nanmean(ssim_per_map(pred[whole], true[whole]))) if whole.any() else float("nan"),
            "paper_rmse": float("nan") if empty else float(np.sqrt(np.mean((minmax(pred)[full] - minmax(true)[full]) ** 2))),
            "paper_abs_pcc": float(np.nanmean(np.abs(r))),
            "measured_fraction": float(mask.mean()) if mask.size else 0.0,
        }
    if normaliser is not None:
        pm = normaliser.to_model(pred.astype(np.float32))[full]
        tm = normaliser.to_model(true.astype(np.float32))[full]
        out["rmse_model"] = float("nan") if empty else float(np.sqrt(np.mean((pm - tm) ** 2)))
    return out


@contextlib.contextmanager
def _quiet_nanmean() -> Iterator[None]:
    """Silence numpy's "Mean of empty slice" warning (an all-NaN metric is reported as NaN)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        yield


def scoring_mask(dataset) -> np.ndarray | None:
    """Return the HR bins a split is scored on, (T, H, W) bool, or None when every bin counts.

    A bin counts when it was measured (``hr_mask``; spot-only slides in the self-supervised mode have bins
    without a spot) and its LR spot was measured (``lr_mask``): a bin under an unmeasured LR spot has nothing
    to super-resolve (its input is empty), so no method is scored on a guess there. Point data (Xenium
    pseudo-spots) measure every bin and spot.
    """
    scale = dataset.geometry.scale
    lr = np.asarray(dataset.lr_mask, dtype=bool).repeat(scale, axis=-2).repeat(scale, axis=-1)
    hr = getattr(dataset, "hr_mask", None)
    mask = lr if hr is None else lr & np.asarray(hr, dtype=bool)
    return None if mask.all() else mask
