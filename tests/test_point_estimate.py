"""The answer of a prediction (X) is the x0-probe estimate of the posterior mean by default; the K samples
still give the spread, and the samples' mean stays available."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_run(prepared_xenium, tmp_path_factory):
    from diffst.config import parse_config
    from diffst.training import train

    cfg = parse_config({"preset": "tiny", "data": {"path": str(prepared_xenium)}, "train": {"steps": 4},
                        "seed": 3, "device": "cpu", "run_dir": str(tmp_path_factory.mktemp("pe") / "run")}, "test")
    return train(cfg)


def test_point_estimate_is_the_probe_and_samples_keep_the_spread(tiny_run, prepared_xenium):
    from diffst.inference.predict import predict_checkpoint

    _, probe, extras = predict_checkpoint(tiny_run, prepared_xenium, sampler={"num_samples": 2, "steps": 2},
                                          progress=False, device="cpu")
    _, mean, _ = predict_checkpoint(tiny_run, prepared_xenium, progress=False, device="cpu",
                                    sampler={"num_samples": 2, "steps": 2, "point_estimate": "sample_mean"})
    assert extras["sampler"]["point_estimate"] == "x0_probe" and extras["sampler"]["probe_draws"] == 8
    # Same seed: the same samples, hence the same spread; only the answer differs.
    np.testing.assert_allclose(probe.samples_model, mean.samples_model)
    np.testing.assert_allclose(probe.std, mean.std)
    assert np.isfinite(probe.mean).all() and probe.mean.min() >= 0
    assert not np.allclose(probe.mean, mean.mean)
