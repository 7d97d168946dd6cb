"""The diffusion target: HR maps or their residual over interpolated LR, exactly invertible."""

import torch

from diffst.diffusion.target import decode_target, encode_target, lr_on_hr_grid


def round_trip_error(hr, lr, kind):
    return float((decode_target(encode_target(hr, lr, kind), lr, kind) - hr).abs().max())


def test_round_trip_and_range(prepared_xenium):
    from diffst.data.dataset import PreparedTiles

    ds = PreparedTiles(prepared_xenium, "train")
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    for kind in ("hr", "residual"):
        assert round_trip_error(batch["hr"], batch["lr"], kind) < 1e-5
    residual = encode_target(batch["hr"], batch["lr"], "residual")
    assert residual.abs().max() <= 1.0 + 1e-6  # stays in the clipping range of the samplers
    # Centred: much closer to zero mean than the HR maps themselves (sparse counts sit near -1).
    assert abs(float(residual.mean())) < 0.5 * abs(float(batch["hr"].mean()))


def test_zero_residual_decodes_to_interpolated_lr():
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    hr = decode_target(torch.zeros(2, 3, 20, 20), lr, "residual")
    torch.testing.assert_close(hr, lr_on_hr_grid(lr, (20, 20)))
    assert torch.equal(decode_target(hr, lr, "hr"), hr)
