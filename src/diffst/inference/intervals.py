"""Prediction intervals of observed counts: the sampled expression plus Poisson counting noise.

A bin's observed count is a draw from Poisson(rate), and the rate is uncertain: the K samples of the
diffusion stage are K plausible rates. The predictive distribution of the count is therefore the mixture
``P(y) = mean_k Poisson(y; rate_k)``, whose central 50 % and 90 % intervals are what a user compares with a
measured count. Samples that spread too little or too much around the point estimate are widened or
narrowed by one factor ``spread`` (``rate_k = point + spread * (sample_k - point)``), fitted on held-out tiles
(:func:`fit_spread`) where any exist; the output's provenance says which factor was used.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LEVELS", "coverage", "fit_spread", "interval_bounds", "mixture_quantiles"]

#: Central interval levels reported: 50 % and 90 % (quantiles 0.25/0.75 and 0.05/0.95).
LEVELS = (0.5, 0.9)


def _rates(samples: np.ndarray, point: np.ndarray | None, spread: float) -> np.ndarray:
    rates = np.asarray(samples, dtype=np.float64)
    if point is not None and spread != 1.0:
        rates = np.asarray(point, dtype=np.float64)[None] + spread * (rates - np.asarray(point, dtype=np.float64)[None])
    return np.clip(rates, 0.0, None)


def mixture_quantiles(rates: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """Quantiles of the mixture of Poisson distributions with the given rates (the first axis).

    Parameters
    ----------
    rates
        (K, ...) non-negative rates; K = 1 gives plain Poisson quantiles.
    quantiles
        Probabilities in (0, 1).

    Returns
    -------
    np.ndarray
        (len(quantiles), ...) smallest counts y with ``mean_k P(Y_k <= y) >= q``, float32 (an integer
        bisection per bin: about log2 of the count range CDF evaluations, K rates each).
    """
    from scipy.special import pdtr

    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim < 1 or not len(rates):
        raise ValueError("mixture_quantiles needs at least one rate per bin (K >= 1)")
    if not np.isfinite(rates).all() or (rates < 0).any():
        raise ValueError("rates must be finite and non-negative")
    k, shape = rates.shape[0], rates.shape[1:]
    flat = rates.reshape(k, -1)
    top = np.ceil(flat.max(axis=0) + 10 * np.sqrt(flat.max(axis=0)) + 10)  # P(Y > top) is negligible
    out = np.empty((len(quantiles), flat.shape[1]), dtype=np.float32)
    for i, q in enumerate(quantiles):
        lo, hi = np.zeros_like(top), top.copy()
        while (open_ := lo < hi).any():
            mid = np.floor((lo + hi) / 2)
            reached = pdtr(mid[None], flat).mean(axis=0) >= q - 1e-12
            hi = np.where(open_ & reached, mid, hi)
            lo = np.where(open_ & ~reached, mid + 1, lo)
        out[i] = lo
    return out.reshape(len(quantiles), *shape)


def interval_bounds(samples: np.ndarray, point: np.ndarray | None = None, spread: float = 1.0,
                    levels: tuple[float, ...] = LEVELS) -> dict[str, np.ndarray]:
    """Central intervals of observed counts per bin, from K samples of the rates.

    Parameters
    ----------
    samples
        (K, ...) sampled counts (rates) per bin.
    point
        The point estimate (...), the centre that ``spread`` scales around; None with ``spread`` 1.
    spread
        Factor on the samples' deviations from ``point`` (1: the raw samples).
    levels
        Central coverage levels, e.g. 0.5 and 0.9.

    Returns
    -------
    dict
        ``q<lo>`` and ``q<hi>`` per level (e.g. ``q05``, ``q95``, ``q25``, ``q75``): arrays shaped like a
        sample.
    """
    probs = sorted({round(p, 4) for lvl in levels for p in ((1 - lvl) / 2, (1 + lvl) / 2)})
    q = mixture_quantiles(_rates(samples, point, spread), tuple(probs))
    return {f"q{round(p * 100):02d}": q[i] for i, p in enumerate(probs)}


def coverage(lower: np.ndarray, upper: np.ndarray, observed: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of observed counts inside ``[lower, upper]`` (inclusive), over the bins of ``mask``."""
    inside = (np.asarray(observed) >= lower) & (np.asarray(observed) <= upper)
    if mask is not None:
        inside = inside[np.broadcast_to(mask, inside.shape)]
    return float(inside.mean()) if inside.size else float("nan")


def fit_spread(samples: np.ndarray, point: np.ndarray, observed: np.ndarray, level: float = 0.9,
               grid: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)) -> float:
    """Find the spread factor whose ``level`` interval covers held-out observed counts closest to ``level``.

    Parameters
    ----------
    samples, point, observed
        (K, ...) samples, (...) point estimate and (...) observed counts of held-out bins.
    level
        The interval level to calibrate (0.9: the 90 % interval).
    grid
        Candidate factors (ties: the smallest).

    Returns
    -------
    float
        The chosen factor.
    """
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    best, best_gap = 1.0, np.inf
    for factor in grid:
        lo, hi = mixture_quantiles(_rates(samples, point, factor), (lo_q, hi_q))
        gap = abs(coverage(lo, hi, observed) - level)
        if gap < best_gap - 1e-9:
            best, best_gap = float(factor), gap
    return best
