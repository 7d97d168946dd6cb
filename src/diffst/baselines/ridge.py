"""Histology ridge: a per-gene ridge regression on log counts from interpolated LR and image statistics.

The features are the interpolated LR map and per-bin image statistics. Cheap, fitted in closed form on the training tiles, and a strong floor for any deep
model: a method that cannot beat it has not learned more from the image than bin averages carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffst.baselines.histology_features import bin_image_stats, neighbourhood_features
from diffst.baselines.interpolation import interpolate_lr


def _design(lr_counts: np.ndarray, tissue: np.ndarray, hr_shape: tuple[int, int], scale: int):
    """Per-bin features: (T, N, H, W) log bicubic and (T, F, H, W) image features."""
    log_bicubic = np.log1p(interpolate_lr(lr_counts, hr_shape, scale))
    image = neighbourhood_features(bin_image_stats(tissue, hr_shape))
    return log_bicubic, image


def _gene_matrix(log_b: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Rows = bins of all tiles; columns = 1, log bicubic, image features, their products with log bicubic."""
    t, f, h, w = image.shape
    img = np.moveaxis(image, 1, -1).reshape(-1, f)
    b = log_b.reshape(-1, 1)
    return np.hstack([np.ones_like(b), b, img, img * b])


@dataclass
class HistologyRidge:
    """Per-gene ridge regression ``log1p(HR) ~ [1, log1p(bicubic), image stats, image stats x log1p(bicubic)]``.

    Image statistics are the mean and standard deviation of every image channel inside each HR bin
    and their 3 x 3 and 7 x 7 neighbourhood means. Features are standardised on the training tiles;
    ``alpha`` is the ridge penalty in those units (the intercept is not penalised).
    """

    alpha: float = 10.0
    coef: np.ndarray | None = None  # (N, P)
    centre: np.ndarray | None = None  # (N, P)
    spread: np.ndarray | None = None  # (N, P)

    def fit(self, lr_counts: np.ndarray, tissue: np.ndarray, hr_counts: np.ndarray, scale: int,
            mask: np.ndarray | None = None) -> HistologyRidge:
        """Fit one ridge per gene on training tiles (on the bins of ``mask`` only, when given).

        Parameters
        ----------
        lr_counts
            (T, N, h, w) LR counts.
        tissue
            (T, C, S, S) tissue-level images.
        hr_counts
            (T, N, H, W) observed HR counts.
        scale
            Super-resolution factor s.
        mask
            (T, H, W) bool: the bins to learn from (measured HR bins under measured LR spots); None: all.
        """
        hr = np.asarray(hr_counts, dtype=np.float64)
        log_b, image = _design(lr_counts, tissue, hr.shape[-2:], scale)
        keep = slice(None) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
        coefs, centres, spreads = [], [], []
        for g in range(hr.shape[1]):
            x = _gene_matrix(log_b[:, g], image).astype(np.float64)[keep]
            y = np.log1p(hr[:, g].reshape(-1))[keep]
            centre, spread = x.mean(axis=0), x.std(axis=0)
            centre[0], spread[0] = 0.0, 1.0
            spread[spread < 1e-8] = 1.0
            z = (x - centre) / spread
            penalty = np.full(z.shape[1], self.alpha)
            penalty[0] = 0.0
            coefs.append(np.linalg.solve(z.T @ z + np.diag(penalty), z.T @ y))
            centres.append(centre)
            spreads.append(spread)
        self.coef, self.centre, self.spread = np.stack(coefs), np.stack(centres), np.stack(spreads)
        return self

    def predict(self, lr_counts: np.ndarray, tissue: np.ndarray, hr_shape: tuple[int, int], scale: int) -> np.ndarray:
        """Predicted HR counts (T, N, H, W), non-negative."""
        if self.coef is None:
            raise RuntimeError("HistologyRidge.predict before fit")
        log_b, image = _design(lr_counts, tissue, tuple(hr_shape), scale)
        t, n = log_b.shape[:2]
        out = np.empty((t, n, *hr_shape), dtype=np.float32)
        for g in range(n):
            z = (_gene_matrix(log_b[:, g], image) - self.centre[g]) / self.spread[g]
            out[:, g] = np.expm1(np.clip(z @ self.coef[g], 0.0, 20.0)).reshape(t, *hr_shape)
        return out
