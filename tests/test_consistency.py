"""Spot consistency: blocks sum to the measured LR counts; shapes inside blocks are kept."""

import numpy as np
import pytest

from diffst.core.spots import project_to_spots
from diffst.data.tiling import block_sum


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


def test_shared_out_spots_sum_exactly_and_follow_the_weights():
    import torch

    from diffst.core.spots import share_out_spots

    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 3, 10, 10, generator=gen, requires_grad=True)
    lr = torch.poisson(torch.full((2, 3, 2, 2), 20.0), generator=gen)
    hr = share_out_spots(weights, lr, scale=5)
    torch.testing.assert_close(torch.as_tensor(block_sum(hr.detach().numpy(), 5)), lr, rtol=1e-5, atol=1e-4)
    # Inside a block the counts follow the softmax of the weights: ratios are exp(weight differences).
    block_w, block_hr = weights[0, 0, :5, :5].detach(), hr[0, 0, :5, :5].detach()
    if lr[0, 0, 0, 0] > 0:
        torch.testing.assert_close(block_hr / block_hr[0, 0], torch.exp(block_w - block_w[0, 0]), rtol=1e-4, atol=1e-5)
    hr[0, 0, 0, 0].backward()
    assert weights.grad is not None and weights.grad[0, 0, :5, :5].abs().sum() > 0
    assert weights.grad[0, 0, 5:, 5:].abs().sum() == 0  # other spots are untouched
    uniform = share_out_spots(torch.zeros(1, 1, 4, 4), torch.tensor([[[[8.0, 4.0], [0.0, 12.0]]]]), scale=2)
    torch.testing.assert_close(uniform[0, 0], torch.tensor([[2.0, 2, 1, 1], [2, 2, 1, 1], [0, 0, 3, 3], [0, 0, 3, 3]]))
    with pytest.raises(ValueError, match="blocks"):
        share_out_spots(torch.zeros(1, 1, 9, 9), torch.zeros(1, 1, 2, 2), scale=5)
