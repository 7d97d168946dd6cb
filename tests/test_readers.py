"""Readers on the real shared data (HER2ST C2) plus Visium / Visium HD / AnnData round trips and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import ndimage
from skimage.filters import threshold_otsu

from conftest import HER2ST_DIR
from diffst.core.image import SlideImage
from diffst.core.sample import Sample, SpotTable
from diffst.errors import GeometryError, InputError
from diffst.io import (
    detect_platform,
    read_anndata,
    read_legacy_st,
    read_sample,
    read_visium,
)
from diffst.io.legacy_st import find_legacy_st
from diffst.io.visium import make_unique, read_10x_h5
from diffst.testing import synthetic_slide, write_visium

C2 = HER2ST_DIR / "C2"
needs_c2 = pytest.mark.skipif(not C2.is_dir(), reason=f"shared HER2ST data not found at {C2} (../shared/data)")


@pytest.fixture(scope="module")
def c2() -> Sample:
    if not C2.is_dir():
        pytest.skip(f"shared HER2ST data not found at {C2} (../shared/data)")
    return read_legacy_st(**find_legacy_st(C2))


@pytest.fixture(scope="module")
def c2_visium(c2, tmp_path_factory) -> Path:
    """A Visium-style outs/ folder written from the real C2 spots (full-res frame = the H&E pixel grid)."""
    outs = tmp_path_factory.mktemp("c2_visium") / "outs"
    write_visium(c2, outs)
    return outs


# ---------------------------------------------------------------------------------------------- legacy ST
@needs_c2
def test_c2_pixel_size_estimated_from_pitch(c2):
    assert c2.platform == "legacy_st"
    assert c2.meta["pixel_size_estimated"]
    assert c2.meta["pixel_size_um"] == pytest.approx(0.69, abs=0.005)
    assert c2.spots.counts.shape == (187, len(c2.genes))
    assert c2.spots.pitch_um == 200.0 and c2.spots.diameter_um == 100.0
    # Counts match the file for a spot picked by id.
    table = pd.read_csv(C2 / "C2.tsv.gz", sep="\t", index_col=0, nrows=40)
    sid = table.index[7]
    row = list(c2.spots.ids).index(sid)
    np.testing.assert_array_equal(c2.spots.counts[row].toarray().ravel(), table.loc[sid].to_numpy())


def _tissue_mask(image: SlideImage):
    """Tissue = darker than the white slide: Otsu on a smoothed grayscale overview, holes filled."""
    overview = image.overview(max_side=1024)
    step = image.shape_px[1] / overview.shape[1]
    gray = ndimage.gaussian_filter(overview.astype(float).mean(axis=-1) / 255.0, 3)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(gray < threshold_otsu(gray), iterations=3))
    return mask, step


@needs_c2
def test_c2_every_spot_inside_image_and_on_tissue(c2):
    assert c2.image.contains_um(c2.spots.xy_um).all()
    mask, step = _tissue_mask(c2.image)
    assert 0.05 < mask.mean() < 0.5  # the section covers a minority of the slide
    # Fraction of tissue under each 100 µm spot footprint (a disc on the overview grid).
    radius = c2.spots.diameter_um / 2 / (c2.image.pixel_size_um * step)
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = (xx**2 + yy**2) <= radius**2
    cover = ndimage.correlate(mask.astype(float), disc / disc.sum(), mode="constant")
    px = np.floor(c2.image.to_px(c2.spots.xy_um) / step).astype(int)
    on_tissue = cover[px[:, 1], px[:, 0]]
    assert on_tissue.min() > 0.3, f"spots off tissue: {np.asarray(c2.spots.ids)[on_tissue <= 0.3]}"
    # The test can fail: the same spots shifted by 2 mm land (mostly) off the tissue.
    shifted = np.floor(c2.image.to_px(c2.spots.xy_um - [2000.0, 2000.0]) / step).astype(int)
    assert cover[shifted[:, 1], shifted[:, 0]].mean() < 0.5


@needs_c2
def test_c2_explicit_pixel_size_inconsistent_with_spacing():
    with pytest.raises(GeometryError, match=r"apart but the platform's pitch is 200"):
        read_legacy_st(**find_legacy_st(C2), pixel_size_um=0.3)


@needs_c2
def test_legacy_corrupt_jpg_and_missing_files(tmp_path):
    files = find_legacy_st(C2)
    bad = tmp_path / "he.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    with pytest.raises(InputError, match=r"Cannot decode image .*he\.jpg"):
        read_legacy_st(files["counts_tsv"], files["selection_tsv"], bad)
    with pytest.raises(InputError, match=r"Counts table not found: .*nope\.tsv\.gz"):
        read_legacy_st(tmp_path / "nope.tsv.gz", files["selection_tsv"], files["image"])
    with pytest.raises(InputError, match=r"selection table not found"):
        read_legacy_st(files["counts_tsv"], tmp_path / "nope_selection.tsv", files["image"])
    with pytest.raises(InputError, match=r"exactly one counts table"):
        find_legacy_st(tmp_path)


@needs_c2
def test_missing_genes_named(c2):
    with pytest.raises(InputError, match=r"lacks 1 requested gene\(s\): \['NOT_A_GENE'\]"):
        c2.gene_indices(["ERBB2", "NOT_A_GENE"])
    assert c2.gene_indices(["ERBB2"]).shape == (1,)


# ---------------------------------------------------------------------------------------------- Visium
@needs_c2
def test_visium_round_trip_from_real_spots(c2, c2_visium):
    spatial = c2_visium / "spatial"
    for fname in ("tissue_positions.csv", "scalefactors_json.json", "tissue_hires_image.png", "tissue_lowres_image.png"):
        assert (spatial / fname).exists()
    # Genuine 10x layouts: positions header and h5 groups.
    header = (spatial / "tissue_positions.csv").read_text().splitlines()[0]
    assert header == "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"
    with h5py.File(c2_visium / "filtered_feature_bc_matrix.h5") as fh:
        assert tuple(fh["matrix/shape"][()]) == (len(c2.genes), 187)
        assert fh["matrix/features/feature_type"][0] == b"Gene Expression"
        assert fh["matrix/barcodes"].dtype.kind == "S"

    v = read_visium(c2_visium, spot_diameter_um=100, pitch_um=200)  # HER2ST geometry in Visium layout
    assert v.platform == "visium" and v.meta["image_kind"] == "hires"
    assert v.genes == c2.genes
    assert list(v.spots.ids) == list(c2.spots.ids)
    assert (v.spots.counts != c2.spots.counts).nnz == 0
    np.testing.assert_allclose(v.spots.xy_um, c2.spots.xy_um, rtol=0, atol=1e-6)
    assert v.meta["um_per_fullres_px"] == pytest.approx(c2.image.pixel_size_um)

    # Hires image: same micron placement within one hires pixel, and the same picture.
    s = v.meta["scalefactors"]["tissue_hires_scalef"]
    np.testing.assert_allclose(v.image.to_px(v.spots.xy_um), c2.image.to_px(c2.spots.xy_um) * s, atol=1e-6)
    for a, b in zip(v.image.extent_um(), c2.image.extent_um(), strict=True):
        assert abs(a - b) <= v.image.pixel_size_um
    for x, y in v.spots.xy_um[::40]:
        hi = v.image.read_region_um(x - 200, y - 200, 400, 400, 10.0)
        full = c2.image.read_region_um(x - 200, y - 200, 400, 400, 10.0)
        assert np.abs(hi - full).mean() < 0.03
        assert np.corrcoef(hi.ravel(), full.ravel())[0, 1] > 0.9

    # Full-resolution image given explicitly: identical placement.
    f = read_visium(c2_visium, fullres_image=C2 / "5714_HE_BT_C2.jpg", spot_diameter_um=100, pitch_um=200)
    assert f.meta["image_kind"] == "fullres" and f.image.pixel_size_um == pytest.approx(c2.image.pixel_size_um)
    np.testing.assert_allclose(f.image.to_px(f.spots.xy_um), c2.image.to_px(c2.spots.xy_um), atol=1e-6)
    assert detect_platform(c2_visium) == "visium"


@needs_c2
def test_visium_wrong_scale_factor_detected(c2_visium, tmp_path):
    hires = c2_visium / "spatial" / "tissue_hires_image.png"
    # The classic mistake: the hires PNG used as if it were the full-resolution image.
    with pytest.raises(GeometryError, match=r"fall outside its image.*looks like the hires image; pass image='hires'"):
        read_visium(c2_visium, fullres_image=hires, spot_diameter_um=100, pitch_um=200)
    # A scale-factor file whose hires factor is wrong.
    import shutil

    copy = tmp_path / "outs"
    shutil.copytree(c2_visium, copy)
    sf = copy / "spatial" / "scalefactors_json.json"
    factors = json.loads(sf.read_text())
    factors["tissue_hires_scalef"] = 1.0
    sf.write_text(json.dumps(factors))
    with pytest.raises(GeometryError, match=r"fall outside its image.*tissue_hires_scalef"):
        read_visium(copy, image="hires", spot_diameter_um=100, pitch_um=200)


def _small_visium(tmp_path: Path, positions_format: str = "csv", **kw) -> tuple[Sample, dict]:
    """A tiny Visium-geometry sample (hex grid, 100 µm pitch) on a synthetic image, written to tmp_path."""
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:6, 0:8]
    x = 150 + cols.ravel() * 100.0 + (rows.ravel() % 2) * 50.0
    y = 150 + rows.ravel() * 100.0 * np.sqrt(3) / 2
    n = len(x)
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n, 5)))
    image = rng.integers(100, 220, size=(1100, 1200, 3), dtype=np.uint8)
    sample = Sample(
        name="tiny", genes=["A", "B", "C", "D", "E"], image=SlideImage(image, pixel_size_um=0.8),
        spots=SpotTable(counts=counts, xy_um=np.column_stack([x, y]), diameter_um=55.0, pitch_um=100.0,
                        ids=np.array([f"AAAC{i:04d}-1" for i in range(n)])),
        platform="visium",
    )
    written = write_visium(sample, tmp_path / "outs", positions_format=positions_format, **kw)
    return sample, written


@pytest.mark.parametrize("fmt", ["csv", "list", "parquet"])
def test_visium_positions_formats(tmp_path, fmt):
    sample, written = _small_visium(tmp_path, positions_format=fmt)
    v = read_visium(tmp_path / "outs")
    assert written["positions"].name == {"csv": "tissue_positions.csv", "list": "tissue_positions_list.csv",
                                         "parquet": "tissue_positions.parquet"}[fmt]
    assert v.platform == "visium"
    assert v.spots.pitch_um == 100.0 and v.spots.diameter_um == 55.0
    np.testing.assert_allclose(v.spots.xy_um, sample.spots.xy_um, atol=1e-6)
    assert (v.spots.counts != sample.spots.counts).nnz == 0


def test_visium_fullres_tiff_written_and_read(tmp_path):
    sample, written = _small_visium(tmp_path, write_fullres=True)
    v = read_visium(tmp_path / "outs", image="fullres", fullres_image=written["fullres"])
    assert v.image.shape_px == sample.image.shape_px
    np.testing.assert_array_equal(v.image.read_px(0, 0, 50, 50), sample.image.read_px(0, 0, 50, 50))
    lo = read_visium(tmp_path / "outs", image="lowres")
    assert lo.image.pixel_size_um == pytest.approx(0.8 / written["scalefactors_values"]["tissue_lowres_scalef"])


def test_visium_only_in_tissue_and_duplicate_symbols(tmp_path):
    sample, written = _small_visium(tmp_path)
    pos = pd.read_csv(written["positions"])
    pos.loc[:4, "in_tissue"] = 0
    pos.to_csv(written["positions"], index=False)
    with h5py.File(written["matrix"], "r+") as fh:
        names = fh["matrix/features/name"][()]
        names[1] = names[0]
        del fh["matrix/features/name"]
        fh["matrix/features/name"] = names
    v = read_visium(tmp_path / "outs")
    assert len(v.spots.ids) == len(sample.spots.ids) - 5
    assert v.genes[:2] == ["A", "A-1"]
    assert make_unique(["A", "A", "A-1", "B"]) == ["A", "A-2", "A-1", "B"]


def test_visium_hd_parquet_from_synthetic(tmp_path):
    slide = synthetic_slide(160, 120, seed=2)
    written = write_visium(slide, tmp_path / "outs", bin_size_um=8)
    folder = tmp_path / "outs" / "binned_outputs" / "square_008um"
    assert written["positions"] == folder / "spatial" / "tissue_positions.parquet"
    factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    assert factors["bin_size_um"] == 8 and factors["microns_per_pixel"] == pytest.approx(0.5)
    for path in (tmp_path / "outs", folder):
        hd = read_visium(path)
        assert hd.platform == "visium_hd"
        assert hd.spots.pitch_um == 8 and hd.spots.diameter_um == 8
        assert hd.spots.counts.sum() == len(slide.transcripts)
        # Bin centres are on the 8 µm grid: (k + 0.5) * 8.
        np.testing.assert_allclose((hd.spots.xy_um / 8 - 0.5) % 1, 0, atol=1e-9)
    # Per-gene totals preserved.
    np.testing.assert_array_equal(hd.gene_totals().to_numpy(), slide.gene_totals().to_numpy())
    assert read_sample(tmp_path / "outs").platform == "visium_hd"


def test_visium_missing_files_named(tmp_path):
    _, written = _small_visium(tmp_path)
    with pytest.raises(InputError, match=r"Space Ranger folder not found"):
        read_visium(tmp_path / "absent")
    written["scalefactors"].rename(tmp_path / "sf.json")
    with pytest.raises(InputError, match=r"Scale factors not found: .*scalefactors_json\.json.*Space Ranger"):
        read_visium(tmp_path / "outs")
    (tmp_path / "sf.json").rename(written["scalefactors"])
    written["positions"].unlink()
    with pytest.raises(InputError, match=r"No tissue_positions\.parquet / tissue_positions\.csv / tissue_positions_list\.csv"):
        read_visium(tmp_path / "outs")
    written["matrix"].unlink()
    with pytest.raises(InputError, match=r"No filtered_feature_bc_matrix\.h5 in .*Visium HD"):
        read_visium(tmp_path / "outs")


def test_visium_corrupt_h5(tmp_path):
    _, written = _small_visium(tmp_path)
    written["matrix"].write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InputError, match=r"Cannot open .*filtered_feature_bc_matrix\.h5 as HDF5.*corrupt"):
        read_visium(tmp_path / "outs")
    with h5py.File(written["matrix"], "w") as fh:
        fh["something"] = [1, 2, 3]
    with pytest.raises(InputError, match=r"no /matrix group"):
        read_10x_h5(written["matrix"])


def test_visium_barcodes_missing_from_matrix(tmp_path):
    _, written = _small_visium(tmp_path)
    pos = pd.read_csv(written["positions"])
    pos.loc[3, "barcode"] = "TTTTGGGG-1"
    pos.to_csv(written["positions"], index=False)
    with pytest.raises(InputError, match=r"1 of 48 in-tissue barcodes .*TTTTGGGG-1.* different Space Ranger runs"):
        read_visium(tmp_path / "outs")


def test_visium_spot_diameter_inconsistent_with_pitch(tmp_path):
    _, written = _small_visium(tmp_path)
    sf = written["scalefactors"]
    factors = json.loads(sf.read_text())
    factors["spot_diameter_fullres"] *= 2.0  # µm/px halves: spots 50 µm apart for a 100 µm pitch
    sf.write_text(json.dumps(factors))
    with pytest.raises(GeometryError, match=r"50\.0 µm apart but the platform's pitch is 100"):
        read_visium(tmp_path / "outs", image="hires")


# ---------------------------------------------------------------------------------------------- AnnData
@needs_c2
def test_anndata_round_trip_real_spots(c2, tmp_path):
    px = c2.image.pixel_size_um
    adata = ad.AnnData(
        X=c2.spots.counts.astype(np.float32),
        obs=pd.DataFrame(index=list(c2.spots.ids)),
        var=pd.DataFrame(index=c2.genes),
    )
    adata.obsm["spatial"] = c2.spots.xy_um / px  # full-resolution pixels, as scanpy keeps them
    a = read_anndata(adata, C2 / "5714_HE_BT_C2.jpg", px, spot_diameter_um=100, pitch_um=200)
    np.testing.assert_allclose(a.spots.xy_um, c2.spots.xy_um, atol=1e-6)
    assert a.genes == c2.genes and (a.spots.counts != c2.spots.counts).nnz == 0
    path = tmp_path / "c2.h5ad"
    adata.obsm["spatial_um"] = c2.spots.xy_um
    adata.write_h5ad(path)
    b = read_anndata(path, c2.image, None, spatial_key="spatial_um", coords_unit="um", pitch_um=200)
    assert b.name == "c2"
    np.testing.assert_allclose(b.spots.xy_um, c2.spots.xy_um, atol=1e-6)
    assert (b.spots.counts != c2.spots.counts).nnz == 0


def _tiny_adata(values, coords=None) -> ad.AnnData:
    values = np.asarray(values, dtype=float)
    adata = ad.AnnData(X=values)
    adata.obsm["spatial"] = (
        np.asarray(coords, dtype=float) if coords is not None else np.column_stack([np.arange(len(values)) * 10.0 + 5, np.full(len(values), 5.0)])
    )
    return adata


_IMG = np.full((40, 60, 3), 200, dtype=np.uint8)


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ([[1, 2], [-1, 0], [3, 4]], r"negative values \(min -1\).*layer="),
        ([[1, np.nan], [0, 0], [3, 4]], r"1 NaN or infinite value"),
        ([[0.69, 1.1], [0.0, 2.3], [1.79, 0.0]], r"looks log-normalised; pass raw counts via layer="),
        ([[1500.5, 2.0], [0.0, 300.25], [12.0, 0.0]], r"looks normalised"),
    ],
)
def test_anndata_bad_counts(values, pattern):
    with pytest.raises(InputError, match=pattern):
        read_anndata(_tiny_adata(values), _IMG, 1.0)


def test_anndata_layer_and_coordinates():
    adata = _tiny_adata(np.log1p([[1, 2], [0, 5], [3, 4]]))
    adata.layers["counts"] = np.array([[1, 2], [0, 5], [3, 4]], dtype=np.int64)
    s = read_anndata(adata, _IMG, 0.5, layer="counts")
    np.testing.assert_allclose(s.spots.xy_um[:, 0], [2.5, 7.5, 12.5])
    with pytest.raises(InputError, match=r"no 'nope'"):
        read_anndata(adata, _IMG, 0.5, layer="nope")
    with pytest.raises(GeometryError, match=r"NaN or infinite coordinates for 1 observation"):
        read_anndata(_tiny_adata([[1, 2], [0, 5], [3, 4]], [[1, 1], [np.nan, 2], [3, 3]]), _IMG, 1.0)
    with pytest.raises(InputError, match=r"obsm has no 'xy'"):
        read_anndata(adata, _IMG, 0.5, spatial_key="xy", layer="counts")
    with pytest.raises(GeometryError, match=r"fall outside its image"):
        read_anndata(_tiny_adata([[1, 2], [0, 5], [3, 4]], [[100, 1], [200, 2], [300, 3]]), _IMG, 1.0)
    with pytest.raises(GeometryError, match=r"pixel_size_um is required"):
        read_anndata(adata, _IMG, None, layer="counts")


def test_shapes_that_disagree():
    with pytest.raises(InputError, match=r"2 spot ids for 3 spots"):
        SpotTable(counts=np.ones((3, 2)), xy_um=np.zeros((3, 2)), diameter_um=55, pitch_um=None, ids=np.array(["a", "b"]))
    with pytest.raises(InputError, match=r"Spot coordinates have shape \(2, 2\) but counts have 3 spots"):
        SpotTable(counts=np.ones((3, 2)), xy_um=np.zeros((2, 2)), diameter_um=55, pitch_um=None, ids=np.array(["a", "b", "c"]))
    with pytest.raises(InputError, match=r"3 spots in counts but coordinates \(3, 2\) and 2 ids"):
        write_visium({"counts": np.ones((3, 2)), "genes": ["g1", "g2"], "xy_um": np.zeros((3, 2)), "ids": ["a", "b"]},
                     Path("/nonexistent/never_written"), fullres_um_per_px=1.0)


@needs_c2
def test_read_sample_dispatch(c2):
    assert detect_platform(C2) == "legacy_st"
    s = read_sample(C2, pixel_size_um=c2.image.pixel_size_um)
    assert s.platform == "legacy_st" and len(s.spots.ids) == 187
