"""Metrics: honest ones and the paper's protocol, side by side.

Honest: signed Pearson r, errors in counts and in model space. The paper's protocol (per-tile, per-gene min-max scaling to [0, 1], RMSE there and |r|), side by side.
"""

from __future__ import annotations

import numpy as np


def pearson_per_map(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Signed Pearson r between matching maps over their last two axes; NaN where a map is constant."""
    p = pred.reshape(*pred.shape[:-2], -1).astype(np.float64)
    t = true.reshape(*true.shape[:-2], -1).astype(np.float64)
    p = p - p.mean(axis=-1, keepdims=True)
    t = t - t.mean(axis=-1, keepdims=True)
    denom = np.sqrt((p * p).sum(axis=-1) * (t * t).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * t).sum(axis=-1) / denom, np.nan)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo = x.min(axis=(-2, -1), keepdims=True)
    hi = x.max(axis=(-2, -1), keepdims=True)
    return np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)


def evaluate_maps(pred_counts: np.ndarray, true_counts: np.ndarray, normaliser=None) -> dict[str, float]:
    """Compare predicted and observed HR counts of shape (tiles, genes, H, W).

    Returns
    -------
    dict with
      ``pcc``: mean over tiles and genes of the signed Pearson r of each map (NaN maps skipped);
      ``pcc_pooled``: mean over genes of r over all bins of all tiles;
      ``rmse_counts`` / ``mae_counts``: RMSE / mean absolute error in counts per HR bin;
      ``ssim``: mean structural similarity of the count maps (each map's data range from both maps);
      ``rmse_model``: RMSE in the normaliser's model space (when a normaliser is given);
      ``paper_rmse`` / ``paper_abs_pcc``: the paper's protocol (per-tile per-gene min-max to [0, 1], |r|).
    """
    pred = np.asarray(pred_counts, dtype=np.float64)
    true = np.asarray(true_counts, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"Prediction shape {pred.shape} differs from ground truth {true.shape}.")
    r = pearson_per_map(pred, true)
    pooled = pearson_per_map(np.moveaxis(pred, 1, 0).reshape(pred.shape[1], 1, -1),
                             np.moveaxis(true, 1, 0).reshape(true.shape[1], 1, -1))
    out = {
        "pcc": float(np.nanmean(r)),
        "pcc_pooled": float(np.nanmean(pooled)),
        "rmse_counts": float(np.sqrt(np.mean((pred - true) ** 2))),
        "mae_counts": float(np.mean(np.abs(pred - true))),
        "ssim": float(np.nanmean(ssim_per_map(pred, true))),
        "paper_rmse": float(np.sqrt(np.mean((_minmax(pred) - _minmax(true)) ** 2))),
        "paper_abs_pcc": float(np.nanmean(np.abs(r))),
    }
    if normaliser is not None:
        pm = normaliser.to_model(pred.astype(np.float32))
        tm = normaliser.to_model(true.astype(np.float32))
        out["rmse_model"] = float(np.sqrt(np.mean((pm - tm) ** 2)))
    return out


def per_gene_pcc(pred_counts: np.ndarray, true_counts: np.ndarray) -> np.ndarray:
    """Signed r per gene, averaged over tiles: shape (genes,)."""
    return np.nanmean(pearson_per_map(np.asarray(pred_counts), np.asarray(true_counts)), axis=0)


def ssim_per_map(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Structural similarity of matching (..., H, W) count maps; NaN where both maps are constant."""
    from skimage.metrics import structural_similarity

    p = np.asarray(pred, dtype=np.float64).reshape(-1, *pred.shape[-2:])
    t = np.asarray(true, dtype=np.float64).reshape(-1, *true.shape[-2:])
    win = min(7, *[d if d % 2 else d - 1 for d in p.shape[-2:]])
    out = np.full(len(p), np.nan)
    for i, (a, b) in enumerate(zip(p, t, strict=True)):
        span = max(a.max(), b.max()) - min(a.min(), b.min())
        if span > 0 and win >= 3:
            out[i] = structural_similarity(a, b, data_range=span, win_size=win)
    return out.reshape(pred.shape[:-2])


def bootstrap_interval(values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Resamples the first axis (e.g. tiles), ignoring NaNs. Returns ``(low, high)``; NaN when fewer than two
    finite values exist.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v.reshape(len(v), -1)
    finite_rows = np.isfinite(v).any(axis=1)
    v = v[finite_rows]
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(v), size=(n_boot, len(v)))
    means = np.array([np.nanmean(v[i]) for i in picks])
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mosaic(maps: np.ndarray, origins_um: np.ndarray, bin_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Stitch tiles of HR maps into one region map, averaging where tiles overlap.

    Parameters
    ----------
    maps
        (T, N, H, W) maps of T tiles on one sample's HR grid.
    origins_um
        (T, 2) tile origins (x0, y0) in microns; they must lie on the HR bin grid relative to each other.
    bin_um
        HR bin side in microns.

    Returns
    -------
    tuple of np.ndarray
        ``(region, covered)``: (N, Hr, Wr) averaged maps (0 where no tile reaches) and the (Hr, Wr) mask of
        bins that some tile covers.
    """
    maps = np.asarray(maps, dtype=np.float64)
    origins = np.asarray(origins_um, dtype=np.float64).reshape(len(maps), 2)
    offsets = (origins - origins.min(axis=0)) / bin_um
    cols_rows = np.rint(offsets).astype(int)
    if np.abs(offsets - cols_rows).max(initial=0.0) > 1e-3:
        raise ValueError("tile origins are not on a common HR bin grid; they cannot be stitched")
    n, h, w = maps.shape[1:]
    width, height = cols_rows[:, 0].max(initial=0) + w, cols_rows[:, 1].max(initial=0) + h
    total = np.zeros((n, height, width))
    count = np.zeros((height, width))
    for tile, (col, row) in zip(maps, cols_rows, strict=True):
        total[:, row : row + h, col : col + w] += tile
        count[row : row + h, col : col + w] += 1
    covered = count > 0
    return np.where(covered, total / np.maximum(count, 1), 0.0), covered


def region_metrics(pred_counts: np.ndarray, true_counts: np.ndarray, origins_um: np.ndarray,
                   bin_um: float, mask: np.ndarray | None = None) -> dict[str, float]:
    """Metrics on the stitched region of one sample's tiles (each HR bin counted once, overlaps averaged).

    ``mask`` (T, H, W), when given, keeps the region's bins that every tile covering them marks True.

    Returns
    -------
    dict with
      ``region_pcc``: mean over genes of the signed Pearson r over the region's bins (genes without
      counts skipped); ``region_rmse_counts``: RMSE in counts per bin over the region.
    """
    pred, covered = mosaic(pred_counts, origins_um, bin_um)
    true, _ = mosaic(true_counts, origins_um, bin_um)
    if mask is not None:
        kept, _ = mosaic(np.asarray(mask, dtype=np.float64)[:, None], origins_um, bin_um)
        covered = covered & (kept[0] > 1 - 1e-9)
    p, t = pred[:, covered], true[:, covered]
    r = pearson_per_map(p[:, None, :], t[:, None, :])  # (N,): one "map" of all covered bins per gene
    with np.errstate(invalid="ignore"):
        pcc = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    return {"region_pcc": pcc, "region_rmse_counts": float(np.sqrt(np.mean((p - t) ** 2)))}
