"""Spot consistency: blocks sum to the measured LR counts; shapes inside blocks are kept."""

import numpy as np
import pytest

from diffst.data.tiling import block_sum
from diffst.inference.consistency import project_to_spots


def test_blocks_sum_to_the_spots_and_keep_their_shape():
    rng = np.random.default_rng(0)
    hr = rng.gamma(2.0, 1.0, size=(4, 2, 3, 20, 20))  # K samples x tiles x genes
    lr = rng.poisson(30.0, size=(2, 3, 4, 4)).astype(float)
    out = project_to_spots(hr, lr, scale=5)
    np.testing.assert_allclose(block_sum(out, 5), np.broadcast_to(lr, (4, 2, 3, 4, 4)), rtol=1e-5)
    ratio = out[0, 0, 0, :5, :5] / hr[0, 0, 0, :5, :5]
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-5)


def test_empty_blocks_get_the_spot_spread_evenly_and_unmeasured_blocks_stay():
    hr = np.ones((1, 1, 4, 4))
    hr[..., :2, :2] = 0.0
    lr = np.full((1, 1, 2, 2), 8.0)
    mask = np.array([[[True, True], [True, False]]])
    out = project_to_spots(hr, lr, scale=2, lr_mask=mask)
    np.testing.assert_allclose(out[0, 0, :2, :2], 2.0)
    np.testing.assert_allclose(out[0, 0, 2:, 2:], 1.0)
    np.testing.assert_allclose(block_sum(out, 2)[0, 0], [[8.0, 8.0], [8.0, 4.0]])


def test_bad_shapes_and_negative_counts_are_refused():
    with pytest.raises(ValueError, match="do not split"):
        project_to_spots(np.ones((1, 10, 10)), np.ones((1, 3, 3)), scale=5)
    with pytest.raises(ValueError, match="non-negative"):
        project_to_spots(-np.ones((1, 10, 10)), np.ones((1, 2, 2)), scale=5)
