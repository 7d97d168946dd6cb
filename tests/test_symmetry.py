"""The square symmetries of a tile: the training augmentation and the averaged regression answer.

``Conditions.symmetry`` must show the model exactly what the training augmentation shows it (same maps,
image, cell grid and patches, entropies) on the real Xenium crop. The answer averaged over all 8 views
(``sampler.point_views``) must then be equivariant: turning the input turns the answer, even for a model
whose weights are not symmetric; it stays spot-consistent; one view is the plain answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from diffst.config import parse_config
from diffst.core.symmetry import SYMMETRIES, apply_symmetry, undo_symmetry
from diffst.data.dataset import PreparedTiles
from diffst.errors import InputError
from diffst.models.base import Conditions
from diffst.runs import load_run, regression_output, regression_point
from diffst.training import train
from test_training import _config as tiny_config


class _Fixed:
    """An rng stand-in that always draws symmetry ``i``."""

    def __init__(self, i: int):
        self.i = i

    def integers(self, n: int) -> int:
        return self.i


@pytest.fixture(scope="module")
def ratio_run(prepared, tmp_path_factory):
    cfg = tiny_config(prepared, tmp_path_factory.mktemp("symmetry") / "run", steps=2, objective="regression",
                      regression="spot_poisson")
    run = load_run(train(parse_config(cfg)), device="cpu")
    # Weights with no symmetry of their own: any equivariance of the averaged answer comes from the average.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return run


def test_numpy_and_torch_symmetries_agree_and_invert():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    images = set()
    for turns, flip in SYMMETRIES:
        a = apply_symmetry(x, turns, flip)
        b = apply_symmetry(torch.from_numpy(x), turns, flip).numpy()
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(undo_symmetry(a, turns, flip), x)
        np.testing.assert_array_equal(undo_symmetry(torch.from_numpy(a.copy()), turns, flip).numpy(), x)
        images.add(a.tobytes())
    assert len(images) == 8 and SYMMETRIES[0] == (0, False)


def test_conditions_symmetry_is_the_training_augmentation(prepared):
    plain = PreparedTiles(prepared, "train")
    seen = PreparedTiles(prepared, "train", augment=True)
    batch = default_collate([plain[i] for i in range(3)])
    cond = Conditions.from_batch(batch, 0.5)
    for i, (turns, flip) in enumerate(SYMMETRIES):
        seen.set_rng(_Fixed(i))
        expected = Conditions.from_batch(default_collate([seen[j] for j in range(3)]), 0.5)
        got = cond.symmetry(turns, flip)
        for name in ("lr", "tissue", "cells", "cell_entropy"):
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
        assert got.entropy_threshold == 0.5


def test_the_eight_view_answer_is_equivariant_and_spot_consistent(ratio_run, prepared):
    run = ratio_run
    test = PreparedTiles(prepared, "test", normaliser=run.dataset.normaliser)
    batch = default_collate([test[i] for i in range(len(test))])
    cond = Conditions.from_batch(batch, run.entropy_threshold)
    shape = tuple(batch["hr"].shape)
    unshrunk = run.config.model_copy(update={"train": run.config.train.model_copy(update={"spot_ratio_shrink": 0.0})})
    with torch.no_grad():
        one = regression_point(run.model, cond, shape, unshrunk, run.dataset, views=1)
        plain = regression_output(run.model, cond, shape, run.config, run.dataset).maps
        eight = regression_point(run.model, cond, shape, run.config, run.dataset, views=8)
        torch.testing.assert_close(one, plain)
        # The single answer is not equivariant (the weights are not), the average over the group is.
        turned_one = regression_point(run.model, cond.symmetry(1, True), shape, unshrunk, run.dataset, views=1)
        assert (turned_one - apply_symmetry(one, 1, True)).abs().max() > 1e-3
        turned = regression_point(run.model, cond.symmetry(1, True), shape, run.config, run.dataset, views=8)
    torch.testing.assert_close(turned, apply_symmetry(eight, 1, True), rtol=1e-4, atol=1e-4)
    # Spot-consistent: each s x s block adds up to its LR spot's count, as every single view does.
    scale = test.geometry.scale
    counts = run.dataset.normaliser.to_counts(eight).numpy()
    b, n, h, w = counts.shape
    blocks = counts.reshape(b, n, h // scale, scale, w // scale, scale).sum(axis=(3, 5))
    lr = np.asarray(test.lr_counts, dtype=np.float64)
    measured = np.asarray(test.lr_mask, bool)[:, None] & (lr > 0)
    np.testing.assert_allclose(blocks[measured], lr[measured], rtol=1e-3)
    with pytest.raises(InputError, match="1 to 8"):
        regression_point(run.model, cond, shape, run.config, run.dataset, views=9)
