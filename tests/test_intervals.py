"""Prediction intervals of observed counts (sampled rates plus Poisson noise) and their calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from diffst.inference.intervals import coverage, fit_spread, interval_bounds, mixture_quantiles


def test_one_rate_gives_the_poisson_quantiles():
    rates = np.array([[0.0, 0.3, 2.0, 17.5, 250.0]])
    q = mixture_quantiles(rates, (0.05, 0.25, 0.75, 0.95))
    for i, p in enumerate((0.05, 0.25, 0.75, 0.95)):
        np.testing.assert_array_equal(q[i], stats.poisson.ppf(p, rates[0]))


def test_mixture_quantiles_solve_the_mixture_cdf():
    rng = np.random.default_rng(1)
    rates = rng.gamma(1.5, 4.0, size=(5, 300))
    for p in (0.05, 0.5, 0.95):
        y = mixture_quantiles(rates, (p,))[0]
        cdf = lambda v: stats.poisson.cdf(v[None], rates).mean(axis=0)  # noqa: E731
        assert (cdf(y) >= p - 1e-12).all()
        assert (cdf(y - 1)[y > 0] < p).all()  # the smallest such count


def test_intervals_cover_counts_drawn_from_the_true_rate():
    rng = np.random.default_rng(0)
    rate = rng.gamma(2.0, 2.0, size=(8, 30, 30))
    observed = rng.poisson(rate)
    bounds = interval_bounds(rate[None])
    assert set(bounds) == {"q05", "q25", "q75", "q95"}
    # Counts are discrete, so inclusive central intervals cover at least their level.
    assert 0.9 <= coverage(bounds["q05"], bounds["q95"], observed) <= 0.97
    assert 0.5 <= coverage(bounds["q25"], bounds["q75"], observed) <= 0.75


def test_spread_is_fitted_to_held_out_coverage():
    rng = np.random.default_rng(2)
    rate = rng.gamma(2.0, 3.0, size=(6, 30, 30))
    observed = rng.poisson(rate)
    # Samples that are far too sure of a wrong rate: the 90 % interval under-covers until widened.
    point = rate * rng.lognormal(0.0, 0.6, size=rate.shape)
    samples = point[None] * rng.lognormal(0.0, 0.05, size=(4, *rate.shape))
    raw = interval_bounds(samples, point)
    factor = fit_spread(samples, point, observed)
    fitted = interval_bounds(samples, point, spread=factor)
    assert factor > 1.0
    assert abs(coverage(fitted["q05"], fitted["q95"], observed) - 0.9) < abs(coverage(raw["q05"], raw["q95"], observed) - 0.9)


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        mixture_quantiles(np.array([[1.0, np.nan]]), (0.5,))
    with pytest.raises(ValueError, match="non-negative"):
        mixture_quantiles(np.array([[-1.0]]), (0.5,))
