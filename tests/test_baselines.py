"""Baselines and evaluation helpers: the histology ridge, the TESLA-style filter, SSIM and intervals."""

import numpy as np
import pytest

from diffst.baselines.interpolation import interpolate_lr
from diffst.baselines.ridge import HistologyRidge
from diffst.baselines.tesla import tesla_like
from diffst.data.dataset import PreparedTiles
from diffst.data.tiling import block_sum
from diffst.evaluation.ceiling import summarise_ceiling
from diffst.evaluation.metrics import bootstrap_interval, evaluate_maps, pearson_per_map, ssim_per_map


def _edge_world(n_tiles=6, genes=2, hr=20, scale=5, seed=0):
    """Tiles whose HR expression is high where the image is bright (a random vertical edge per tile)."""
    rng = np.random.default_rng(seed)
    tissue = np.zeros((n_tiles, 3, 80, 80), np.uint8)
    rate = np.zeros((n_tiles, genes, hr, hr))
    for i in range(n_tiles):
        cut = rng.integers(4, hr - 4)
        tissue[i, :, :, cut * 4 :] = 220
        rate[i, :, :, cut:] = 6.0
        rate[i, :, :, :cut] = 0.5
    hr_counts = rng.poisson(rate).astype(np.float32)
    return block_sum(hr_counts, scale), tissue, hr_counts, rate


def test_ridge_learns_what_the_image_says():
    lr, tissue, hr, rate = _edge_world()
    model = HistologyRidge(alpha=1.0).fit(lr[:4], tissue[:4], hr[:4], scale=5)
    pred = model.predict(lr[4:], tissue[4:], (20, 20), scale=5)
    bicubic = interpolate_lr(lr[4:], (20, 20), 5)
    assert pred.shape == bicubic.shape and np.isfinite(pred).all() and pred.min() >= 0
    assert np.nanmean(pearson_per_map(pred, rate[4:])) > np.nanmean(pearson_per_map(bicubic, rate[4:])) + 0.05


def test_ridge_fits_real_training_tiles_at_least_as_well_as_bicubic(prepared_xenium):
    tiles = PreparedTiles(prepared_xenium, "train")
    lr, tissue, hr = (np.asarray(a) for a in (tiles.lr_counts, tiles.tissue, tiles.hr_counts))
    s = tiles.geometry.scale
    model = HistologyRidge().fit(lr, tissue, hr, scale=s)
    pred = model.predict(lr, tissue, hr.shape[-2:], scale=s)
    bicubic = interpolate_lr(lr, hr.shape[-2:], s)
    log_err = np.mean((np.log1p(pred) - np.log1p(hr)) ** 2)
    assert log_err <= np.mean((np.log1p(bicubic) - np.log1p(hr)) ** 2)


def test_tesla_follows_image_edges_and_is_plain_smoothing_on_a_flat_image():
    lr, tissue, _, rate = _edge_world()
    sharp = tesla_like(lr, tissue, (20, 20), 5)
    bicubic = interpolate_lr(lr, (20, 20), 5)
    assert np.nanmean(pearson_per_map(sharp, rate)) > np.nanmean(pearson_per_map(bicubic, rate))
    flat = tesla_like(lr, np.full_like(tissue, 128), (20, 20), 5)
    np.testing.assert_allclose(flat.mean(axis=(-2, -1)), bicubic.mean(axis=(-2, -1)), rtol=0.1)


def test_ssim_and_mae_and_interval():
    rng = np.random.default_rng(0)
    truth = rng.poisson(3.0, size=(4, 2, 16, 16)).astype(float)
    assert np.allclose(ssim_per_map(truth, truth), 1.0)
    noisy = truth + rng.normal(0, 2, truth.shape)
    assert (ssim_per_map(noisy, truth) < 0.9).all()
    m = evaluate_maps(truth + 1.0, truth)
    assert m["mae_counts"] == pytest.approx(1.0) and m["rmse_counts"] == pytest.approx(1.0)
    low, high = bootstrap_interval(np.array([0.1, 0.2, 0.3, 0.4, 0.5]))
    assert 0.1 < low < 0.3 < high < 0.5
    assert np.isnan(bootstrap_interval(np.array([0.3]))[0])


def test_ceiling_skips_genes_without_counts():
    summary = summarise_ceiling(np.array([0.8, np.nan, 0.6]), ["A", "B", "C"])
    assert summary == {"pcc": pytest.approx(0.7), "genes_skipped": ["B"], "n_genes_skipped": 1}
