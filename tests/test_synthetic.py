"""The synthetic slide: reproducible, the requested size, and an image registered to the cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffst.errors import InputError
from diffst.testing import synthetic_slide


@pytest.fixture(scope="module")
def slide():
    return synthetic_slide(300, 200, seed=5)


def test_reproducible_from_seed(slide):
    again = synthetic_slide(300, 200, seed=5)
    pd.testing.assert_frame_equal(slide.transcripts, again.transcripts)
    np.testing.assert_array_equal(slide.image.read_px(0, 0, 400, 600), again.image.read_px(0, 0, 400, 600))
    other = synthetic_slide(300, 200, seed=6)
    assert len(other.transcripts) != len(slide.transcripts) or not np.array_equal(
        other.transcripts["x_um"].to_numpy(), slide.transcripts["x_um"].to_numpy()
    )


@pytest.mark.parametrize(("w", "h", "px"), [(300, 200, 0.5), (123.5, 77.0, 0.5), (64, 512, 1.0), (10, 10, 0.25)])
def test_requested_size_honoured(w, h, px):
    s = synthetic_slide(w, h, pixel_size_um=px, seed=1)
    assert s.image.shape_px == (round(h / px), round(w / px))
    assert s.image.extent_um() == pytest.approx((0.0, 0.0, w, h), abs=px)
    assert s.image.pixel_size_um == px
    xy = s.xy_um()
    assert xy.min() >= 0 and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    assert len(s.transcripts) > 0
    s.check_registration()


def test_structure_genes_types_and_counts(slide):
    assert slide.platform == "synthetic" and len(slide.genes) == 12
    assert slide.transcripts["gene"].between(0, 11).all()
    cells = slide.meta["cells"]
    assert set(cells["cell_type"]) == {0, 1, 2}
    # Transcripts stay inside their cell's disc (12 µm diameter).
    tx = slide.transcripts
    d = np.hypot(tx["x_um"].to_numpy() - cells["x_um"].to_numpy()[tx["cell_id"]],
                 tx["y_um"].to_numpy() - cells["y_um"].to_numpy()[tx["cell_id"]])
    assert d.max() <= 6.0 + 1e-9
    # Marker genes are enriched in their cell type.
    per_cell = np.zeros((len(cells), len(slide.genes)))
    np.add.at(per_cell, (tx["cell_id"].to_numpy(), tx["gene"].to_numpy()), 1)
    for t, idx in slide.meta["markers"].items():
        own = per_cell[cells["cell_type"].to_numpy() == t][:, idx].mean()
        rest = per_cell[cells["cell_type"].to_numpy() != t][:, idx].mean()
        assert own > 3 * rest
    # Genes of one module are co-expressed across cells more than genes of different modules.
    mods = [idx for idx in slide.meta["modules"].values() if len(idx) >= 2]
    within = np.corrcoef(per_cell[:, mods[0][0]], per_cell[:, mods[0][1]])[0, 1]
    assert within > 0.3


def test_image_registered_to_cells(slide):
    img = slide.image
    assert img.is_rgb
    cells = slide.meta["cells"]
    centres = cells[["x_um", "y_um"]].to_numpy()
    gray = lambda xy: np.mean([img.values_at_um(xy, channel=c) for c in range(3)], axis=0)  # noqa: E731
    nuclei = gray(centres)
    # Background: points at least 2 cell diameters away from every cell centre (or the gaps between cells).
    rng = np.random.default_rng(0)
    probe = rng.uniform([0, 0], [300, 200], size=(4000, 2))
    dist = np.min(np.hypot(probe[:, None, 0] - centres[None, :, 0], probe[:, None, 1] - centres[None, :, 1]), axis=1)
    background = gray(probe[dist > 7.0])
    assert nuclei.mean() < background.mean() - 60
    assert np.median(nuclei) < np.percentile(background, 5)
    # Nuclear transcripts lie on darker pixels than cytoplasmic ones.
    tx = slide.transcripts
    on = gray(tx.loc[tx["overlaps_nucleus"] == 1, ["x_um", "y_um"]].to_numpy())
    off = gray(tx.loc[tx["overlaps_nucleus"] == 0, ["x_um", "y_um"]].to_numpy())
    assert on.mean() < off.mean() - 30
    # Nucleus size depends on cell type (type 2 biggest).
    radius = cells.groupby("cell_type")["nucleus_radius_um"].mean()
    assert radius[0] < radius[1] < radius[2]


def test_bad_arguments():
    with pytest.raises(InputError, match=r"Slide size -5 x 10"):
        synthetic_slide(-5, 10)
    with pytest.raises(InputError, match=r"pixel_size_um=0"):
        synthetic_slide(10, 10, pixel_size_um=0)
    with pytest.raises(InputError, match=r"n_genes=2, n_cell_types=3"):
        synthetic_slide(10, 10, n_genes=2)
