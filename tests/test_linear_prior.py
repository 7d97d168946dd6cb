"""Stage one started from the histology ridge (``train.linear_prior``).

The closed-form prior, fitted from the training tiles by streaming normal equations, must be the histology
ridge of the benchmark (same features, same penalty): with the network's own log-weights switched off, the
model's answer equals ``ridge+spots`` on the real held-out tiles. It is saved with the weights, survives
reloading, and training on top of it starts from it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffst.benchmark.methods import predict_method
from diffst.config import parse_config
from diffst.data.dataset import PreparedTiles
from diffst.inference.predict import predict_checkpoint
from diffst.models.spot_ratio import LinearPrior, fit_linear_prior, prior_features
from diffst.runs import load_run
from diffst.training import train
from test_training import _config as tiny_config


@pytest.fixture(scope="module")
def prior_run(prepared, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(prepared, tmp_path_factory.mktemp("prior") / "run", steps=2, objective="regression",
                          regression="spot_poisson", linear_prior=True, lr=1e-12,
                          spot_ratio_shrink=0.0)  # the answer alone, to compare with the ridge
        return train(parse_config(cfg))
    finally:
        torch.set_num_threads(before)


class _Silent(torch.nn.Module):
    """Wrap a backbone so that its log-weights are zero (its auxiliary losses kept)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x_t, t, **conditions):
        out = self.backbone(x_t, t, **conditions)
        return type(out)(out.prediction * 0.0, out.aux_losses)


def test_prior_alone_is_the_histology_ridge_made_spot_consistent(prior_run, prepared):
    run = load_run(prior_run, device="cpu")
    assert bool(run.model.linear_prior.fitted)
    run.model.backbone = _Silent(run.model.backbone)
    with torch.no_grad():
        run.model.image_head.weight.zero_()
        run.model.image_head.bias.zero_()
    _, preds, _ = predict_checkpoint(prior_run, prepared, split="test", device="cpu", seed=0, progress=False, run=run)
    ours = np.asarray(preds.mean, dtype=np.float64)
    ridge = predict_method("ridge+spots", prepared).astype(np.float64)
    # The same regression, fitted two ways (streamed normal equations in torch, design matrix in numpy).
    np.testing.assert_allclose(ours, ridge, rtol=0.02, atol=0.1)  # the floor of empty bins differs
    truth = np.asarray(PreparedTiles(prepared, "test").hr_counts)
    assert np.corrcoef(ours.ravel(), truth.ravel())[0, 1] == pytest.approx(
        np.corrcoef(ridge.ravel(), truth.ravel())[0, 1], abs=2e-3)


def test_prior_is_saved_and_the_run_starts_from_it(prior_run, prepared):
    run = load_run(prior_run, device="cpu")
    prior = run.model.linear_prior
    assert float(prior.w_image.abs().sum()) > 0 and float(prior.w_lr.abs().sum()) > 0
    tiles = PreparedTiles(prepared, "train")
    assert prior.log1p_scale.numpy() == pytest.approx(np.asarray(tiles.normaliser.scale, dtype=np.float32).ravel())


def test_unfitted_prior_changes_nothing_and_masked_bins_are_left_out():
    rng = np.random.default_rng(0)
    n, c, h = 3, 1, 8
    lr = torch.from_numpy(rng.uniform(-1, 1, (4, n, 4, 4)).astype(np.float32))
    tissue = torch.from_numpy(rng.random((4, c, 32, 32)).astype(np.float32))
    feats = prior_features(tissue, (h, h))
    prior = LinearPrior(n, feats.shape[1])
    assert torch.count_nonzero(prior(lr, feats)) == 0
    hr = torch.from_numpy(rng.poisson(3.0, (4, n, h, h)).astype(np.float32))
    mask = torch.ones(4, h, h, dtype=torch.bool)
    mask[:, :, :2] = False
    corrupted = hr.clone()
    corrupted[:, :, :, :2] = 0.0  # what unmeasured bins hold
    scale = torch.full((n,), 3.0)
    a = fit_linear_prior([{"lr": lr, "tissue": tissue, "hr_counts": hr, "mask": mask}], scale, feats.shape[1])
    b = fit_linear_prior([{"lr": lr, "tissue": tissue, "hr_counts": corrupted, "mask": mask}], scale, feats.shape[1])
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # streamed in two batches = fitted at once
    halves = [{"lr": lr[i:i + 2], "tissue": tissue[i:i + 2], "hr_counts": hr[i:i + 2], "mask": mask[i:i + 2]}
              for i in (0, 2)]
    c2 = fit_linear_prior(halves, scale, feats.shape[1])
    for key in a:
        torch.testing.assert_close(a[key], c2[key], rtol=1e-4, atol=1e-5)
