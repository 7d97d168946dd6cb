"""Inputs from the scverse tools: SpatialData zarr stores (as spatialdata-io writes them) and AnnData with its image.

The stores are built from real data, the way spatialdata-io lays them out: the built-in Xenium crop (points
``transcripts`` in microns mapped to the morphology pixel frame, multiscale ``morphology_focus``), square bins of
its transcripts in the Visium HD layout, and the real HER2ST C2 spots in the Visium layout (circles in
full-resolution pixels, ``*_hires_image`` only in ``downscaled_hires``). Each read must agree with Diff-ST's own
reader of the same data. Needs the ``spatial`` extra (skipped without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image
from typer.testing import CliRunner

from conftest import HER2ST_DIR
from diffst.cli import app
from diffst.errors import GeometryError, InputError
from diffst.example import EXAMPLE_DIR, EXAMPLE_ORIGIN_UM, load_example
from diffst.io import detect_platform, read_anndata, read_sample, read_spatialdata, read_visium

sd = pytest.importorskip("spatialdata")
models = pytest.importorskip("spatialdata.models")
tf = pytest.importorskip("spatialdata.transformations")
gpd = pytest.importorskip("geopandas")
shapely = pytest.importorskip("shapely")

C2 = HER2ST_DIR / "C2"
EXAMPLE_PX = 0.425  # µm per pixel of the built-in morphology image
runner = CliRunner()


# ---------------------------------------------------------------------------------------------- store builders
def _example_image(transformations: dict, scale_factors=(2,)):
    pixels = tifffile.imread(EXAMPLE_DIR / "morphology_mip.ome.tif")
    return models.Image2DModel.parse(pixels[None], dims=("c", "y", "x"), scale_factors=list(scale_factors) or None,
                                     transformations=transformations)


def _example_points(transformations: dict):
    tx = pd.read_parquet(EXAMPLE_DIR / "transcripts.parquet")
    frame = pd.DataFrame({
        "x": tx["x_location"].to_numpy(), "y": tx["y_location"].to_numpy(), "feature_name": tx["feature_name"],
        "qv": tx["qv"].to_numpy(), "overlaps_nucleus": tx["overlaps_nucleus"].to_numpy(),
        "transcript_id": np.arange(len(tx), dtype=np.int64), "cell_id": np.zeros(len(tx), np.int64),
    })
    import dask.dataframe as dd

    # Several partitions, as a slide's transcripts are stored: they are read one at a time.
    return models.PointsModel.parse(dd.from_pandas(frame, npartitions=3), feature_key="feature_name",
                                    instance_key="cell_id", transformations=transformations), tx


def _xenium_frames(frame: str):
    """Transformations of image and points: spatialdata-io's (``global`` = morphology pixels) or microns."""
    ox, oy = EXAMPLE_ORIGIN_UM
    if frame == "pixels":  # spatialdata-io: transcripts (µm) -> pixels; the crop corner sits at (ox, oy) µm
        image = tf.Identity()
        points = tf.Sequence([tf.Translation([-ox, -oy], axes=("x", "y")),
                              tf.Scale([1 / EXAMPLE_PX, 1 / EXAMPLE_PX], axes=("x", "y"))])
    else:  # global in microns: the image is scaled and shifted, the transcripts are as they are
        image = tf.Sequence([tf.Scale([EXAMPLE_PX, EXAMPLE_PX], axes=("x", "y")),
                             tf.Translation([ox, oy], axes=("x", "y"))])
        points = tf.Identity()
    return image, points


def _bin_table(tx: pd.DataFrame, bin_um: float, origin=EXAMPLE_ORIGIN_UM):
    """Counts of the real transcripts (qv >= 20) in square bins of ``bin_um``: (counts CSR, genes, bin col/row)."""
    tx = tx[tx["qv"] >= 20]
    col = np.floor((tx["x_location"].to_numpy() - origin[0]) / bin_um).astype(int)
    row = np.floor((tx["y_location"].to_numpy() - origin[1]) / bin_um).astype(int)
    codes, genes = pd.factorize(tx["feature_name"].astype(str), sort=True)
    keys, inverse = np.unique(np.column_stack([col, row]), axis=0, return_inverse=True)
    counts = sp.csr_matrix((np.ones(len(codes)), (inverse.ravel(), codes)), shape=(len(keys), len(genes)))
    counts.sum_duplicates()
    return counts, list(genes), keys


def _write(sdata, path: Path) -> Path:
    sdata.write(path)
    return path


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module", params=["pixels", "microns"])
def xenium_store(request, tmp_path_factory) -> Path:
    """The built-in crop as spatialdata-io writes a Xenium run (plus a cell table, which points take precedence over)."""
    image_tf, points_tf = _xenium_frames(request.param)
    points, tx = _example_points({"global": points_tf})
    counts, genes, keys = _bin_table(tx, 12.75)  # a coarse "cell" table annotating circles, as Xenium stores hold
    centres_px = (keys + 0.5) * 12.75 / EXAMPLE_PX  # 30 px bins tile the 1200 x 900 px image exactly
    circles = models.ShapesModel.parse(centres_px, geometry=0, radius=np.full(len(keys), 5.0),
                                       index=pd.RangeIndex(len(keys)), transformations={"global": image_tf})
    cells = ad.AnnData(X=counts, var=pd.DataFrame(index=genes))
    cells.obs["region"] = pd.Categorical(["cell_circles"] * cells.n_obs)
    cells.obs["cell_id"] = np.arange(cells.n_obs)
    table = models.TableModel.parse(cells, region="cell_circles", region_key="region", instance_key="cell_id")
    sdata = sd.SpatialData(
        images={"morphology_focus": _example_image({"global": image_tf}),
                "morphology_mip": _example_image({"global": image_tf}, scale_factors=())},
        points={"transcripts": points}, shapes={"cell_circles": circles}, tables={"table": table})
    return _write(sdata, tmp_path_factory.mktemp(f"xenium_{request.param}") / "xenium.zarr")


# ---------------------------------------------------------------------------------------------- Xenium
def test_xenium_store_equals_read_xenium(xenium_store, example):
    assert detect_platform(xenium_store) == "spatialdata"
    s = read_sample(xenium_store)
    assert s.platform == "xenium" and s.has_points
    assert s.meta["points_element"] == "transcripts" and s.meta["image_element"] == "morphology_focus"
    # Only the needed columns are read (the store also holds transcript_id and cell_id).
    assert s.meta["points_columns"] == ["x", "y", "feature_name", "qv", "overlaps_nucleus"]
    assert list(s.transcripts.columns) == ["gene", "x_um", "y_um", "overlaps_nucleus"]  # qv only filters
    assert s.transcripts["x_um"].dtype == np.float32 and s.transcripts["gene"].dtype == np.int16
    np.testing.assert_array_equal(s.transcripts["overlaps_nucleus"].to_numpy(),
                                  example.transcripts["overlaps_nucleus"].to_numpy())
    assert s.genes == example.genes
    assert len(s.transcripts) == len(example.transcripts)
    np.testing.assert_array_equal(s.transcripts["gene"].to_numpy(), example.transcripts["gene"].to_numpy())
    np.testing.assert_allclose(s.transcripts[["x_um", "y_um"]].to_numpy(),
                               example.transcripts[["x_um", "y_um"]].to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(s.gene_totals().to_numpy(), example.gene_totals().to_numpy())
    # Same image placement: every transcript maps to the same pixel, and that pixel holds the same value.
    xy = example.transcripts[["x_um", "y_um"]].to_numpy()[::97]
    np.testing.assert_allclose(s.image.to_px(xy), example.image.to_px(xy), atol=1e-6)
    np.testing.assert_array_equal(s.image.values_at_um(xy), example.image.values_at_um(xy))
    assert s.image.pixel_size_um == pytest.approx(EXAMPLE_PX)
    assert s.image.extent_um() == pytest.approx(example.image.extent_um())
    assert not s.image.from_matrix
    # The multiscale image is kept as a pyramid, read lazily; a region reads the same pixels.
    assert len(s.image._levels) == 2
    np.testing.assert_array_equal(s.image.read_px(100, 200, 50, 60), example.image.read_px(100, 200, 50, 60))


def test_xenium_store_options(xenium_store, example):
    # The other image by name (or by its folder), a stricter quality filter, an explicit coordinate system.
    s = read_spatialdata(xenium_store, image=xenium_store / "images" / "morphology_mip", min_qv=30,
                         coordinate_system="global")
    assert s.meta["image_element"] == "morphology_mip" and len(s.image._levels) == 1
    assert len(s.transcripts) == int((pd.read_parquet(EXAMPLE_DIR / "transcripts.parquet")["qv"] >= 30).sum())
    # The cell table instead of the transcripts: spots at the 12.75 µm bin centres, in the same micron frame.
    cells = read_spatialdata(xenium_store / "tables" / "table", spot_diameter_um=10 * EXAMPLE_PX)  # radius 5 px
    assert not cells.has_points and cells.spots.counts.sum() == len(example.transcripts)
    px = cells.image.to_px(cells.spots.xy_um)
    np.testing.assert_allclose(px, example.image.to_px(cells.spots.xy_um + np.array(EXAMPLE_ORIGIN_UM)), atol=1e-6)
    with pytest.raises(InputError, match=r"coordinate_system 'aligned' is not among .*\['global'\]"):
        read_spatialdata(xenium_store, coordinate_system="aligned")
    with pytest.raises(InputError, match=r"no image 'he'; its images: \['morphology_focus', 'morphology_mip'\]"):
        read_spatialdata(xenium_store, image="he")


def test_cli_prepare_from_store(xenium_store, tmp_path):
    out = tmp_path / "prepared"
    result = runner.invoke(app, ["prepare", str(xenium_store), "--out", str(out), "--n-genes", "4",
                                 "--train-stride", "100", "--test-region", "1372,212,1572,594.5"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "dataset.json").read_text())
    assert sum(meta["n_tiles"].values()) > 0 and len(meta["genes"]) == 4
    assert meta["samples"][0]["platform"] == "xenium"
    assert meta["samples"][0]["pixel_size_um"] == pytest.approx(EXAMPLE_PX)
    # --image picks the image element; flags of other platforms are refused.
    bad = runner.invoke(app, ["prepare", str(xenium_store), "--out", str(tmp_path / "p2"), "--image-origin", "0,0"])
    assert bad.exit_code != 0 and "--image-origin does not apply" in bad.output
    bad = runner.invoke(app, ["prepare", str(xenium_store), "--out", str(tmp_path / "p3"), "--image", "nope"])
    assert bad.exit_code != 0 and "no image 'nope'" in bad.output


# ---------------------------------------------------------------------------------------------- Visium HD
@pytest.fixture(scope="module")
def hd_store(tmp_path_factory):
    """Square bins of the real transcripts in the Visium HD layout: 8 and 16 µm tables, bins in full-res pixels."""
    tx = pd.read_parquet(EXAMPLE_DIR / "transcripts.parquet")
    shapes, tables, truth = {}, {}, {}
    for bin_um in (8, 16):
        counts, genes, keys = _bin_table(tx, float(bin_um))
        side = bin_um / EXAMPLE_PX  # full-resolution pixels, as spot_diameter_fullres
        centres = (keys + 0.5) * side
        squares = models.ShapesModel.parse(
            gpd.GeoDataFrame(geometry=shapely.box(
                centres[:, 0] - side / 2, centres[:, 1] - side / 2, centres[:, 0] + side / 2, centres[:, 1] + side / 2),
                index=pd.RangeIndex(len(keys))),
            transformations={"global": tf.Identity()})
        name = f"crop_square_{bin_um:03d}um"
        adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"s_{bin_um:03d}um_{c:05d}_{r:05d}" for c, r in keys]),
                           var=pd.DataFrame(index=genes))
        adata.obs["region"] = pd.Categorical([name] * adata.n_obs)
        adata.obs["location_id"] = np.arange(adata.n_obs)
        shapes[name] = squares
        tables[f"square_{bin_um:03d}um"] = models.TableModel.parse(adata, region=name, region_key="region",
                                                                   instance_key="location_id")
        truth[bin_um] = (counts, genes, centres)
    sdata = sd.SpatialData(images={"crop_full_image": _example_image({"global": tf.Identity()})}, shapes=shapes,
                           tables=tables)
    return _write(sdata, tmp_path_factory.mktemp("hd") / "hd.zarr"), truth


def test_visium_hd_store(hd_store, example):
    store, truth = hd_store
    with pytest.raises(InputError, match=r"holds 2 tables \['square_008um', 'square_016um'\]; pick one with table= "
                                         r"\(read_spatialdata\) or --input STORE/tables/NAME"):
        read_spatialdata(store)
    s = read_sample(store / "tables" / "square_008um")
    counts, genes, centres_px = truth[8]
    assert s.platform == "visium_hd" and s.spots.diameter_um == 8 and s.spots.pitch_um == 8
    assert s.genes == genes and (s.spots.counts != counts).nnz == 0
    assert s.meta["um_per_unit"] == pytest.approx(EXAMPLE_PX)
    np.testing.assert_allclose(s.spots.xy_um, centres_px * EXAMPLE_PX, atol=1e-6)
    np.testing.assert_allclose(s.image.to_px(s.spots.xy_um), centres_px, atol=1e-6)
    assert s.image.pixel_size_um == pytest.approx(EXAMPLE_PX)
    # The bins hold the crop's transcripts: their sum is the number read by read_xenium.
    assert s.spots.counts.sum() == len(example.transcripts)
    s16 = read_spatialdata(store, table="square_016um")
    assert s16.spots.pitch_um == 16 and s16.spots.counts.sum() == len(example.transcripts)


# ---------------------------------------------------------------------------------------------- Visium (real C2)
@pytest.fixture(scope="module")
def c2_visium(tmp_path_factory):
    if not C2.is_dir():
        pytest.skip(f"shared HER2ST data not found at {C2} (../shared/data)")
    from diffst.io import read_legacy_st
    from diffst.io.legacy_st import find_legacy_st
    from diffst.testing import write_visium

    outs = tmp_path_factory.mktemp("c2_visium") / "outs"
    write_visium(read_legacy_st(**find_legacy_st(C2)), outs)
    # HER2ST spots (100 µm, 200 µm pitch) in the Visium layout: Diff-ST's own reader of the folder is the reference.
    return outs, read_visium(outs, spot_diameter_um=100, pitch_um=200)


def _c2_parts(outs: Path, reference):
    factors = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv").set_index("barcode")
    coords = positions.loc[list(reference.spots.ids), ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    images = {k: np.asarray(Image.open(outs / "spatial" / f"tissue_{k}_image.png").convert("RGB"))
              for k in ("hires", "lowres")}
    return factors, coords, images


@pytest.fixture(scope="module")
def c2_store(c2_visium, tmp_path_factory):
    """The C2 Visium folder as spatialdata-io's visium() lays it out."""
    outs, reference = c2_visium
    factors, coords, images = _c2_parts(outs, reference)
    adata = ad.AnnData(X=reference.spots.counts, obs=pd.DataFrame(index=list(reference.spots.ids)),
                       var=pd.DataFrame(index=reference.genes))
    adata.obsm["spatial"] = coords
    adata.obs["spot_id"] = np.arange(adata.n_obs)
    adata.obs["region"] = pd.Categorical(["C2"] * adata.n_obs)
    hs, ls = factors["tissue_hires_scalef"], factors["tissue_lowres_scalef"]
    circles = models.ShapesModel.parse(
        coords, geometry=0, radius=np.full(len(coords), factors["spot_diameter_fullres"] / 2),
        index=adata.obs["spot_id"].copy(),
        transformations={"global": tf.Identity(), "downscaled_hires": tf.Scale([hs, hs], axes=("y", "x")),
                         "downscaled_lowres": tf.Scale([ls, ls], axes=("y", "x"))})
    table = models.TableModel.parse(adata, region="C2", region_key="region", instance_key="spot_id")
    sdata = sd.SpatialData(
        images={f"C2_{k}_image": models.Image2DModel.parse(np.moveaxis(a, -1, 0), dims=("c", "y", "x"),
                                                            transformations={f"downscaled_{k}": tf.Identity()})
                for k, a in images.items()},
        shapes={"C2": circles}, tables={"table": table})
    return _write(sdata, tmp_path_factory.mktemp("c2_store") / "c2.zarr")


def test_visium_store_equals_read_visium(c2_visium, c2_store):
    _, reference = c2_visium
    s = read_spatialdata(c2_store, spot_diameter_um=100, pitch_um=200)
    assert s.platform == "visium" and s.meta["image_element"] == "C2_hires_image"
    assert s.meta["coordinate_system"] == "downscaled_hires"  # the hires image lives only there
    assert s.genes == reference.genes and list(s.spots.ids) == list(reference.spots.ids)
    assert (s.spots.counts != reference.spots.counts).nnz == 0
    np.testing.assert_allclose(s.spots.xy_um, reference.spots.xy_um, atol=1e-6)
    np.testing.assert_allclose(s.image.to_px(s.spots.xy_um), reference.image.to_px(reference.spots.xy_um), atol=1e-6)
    assert s.image.pixel_size_um == pytest.approx(reference.image.pixel_size_um)
    # Given the image's pixel size instead, the spot diameter follows from the circles: HER2ST's 100 µm, pitch 200.
    hires_px = reference.image.pixel_size_um
    p = read_spatialdata(c2_store, pixel_size_um=hires_px)
    assert p.spots.diameter_um == pytest.approx(100) and p.spots.pitch_um == 200
    np.testing.assert_allclose(p.spots.xy_um, reference.spots.xy_um, atol=1e-6)
    # The lowres image, picked by name, places the spots the same way.
    low = read_spatialdata(c2_store, image="C2_lowres_image", spot_diameter_um=100, pitch_um=200)
    assert low.meta["coordinate_system"] == "downscaled_lowres"
    scale = reference.image.pixel_size_um / low.image.pixel_size_um
    np.testing.assert_allclose(low.image.to_px(low.spots.xy_um), reference.image.to_px(reference.spots.xy_um) * scale,
                               atol=1e-6)
    # Without a geometry the circles are taken for Visium's 55 µm spots (the scale of a real Visium store).
    v = read_spatialdata(c2_store)
    assert v.spots.diameter_um == 55 and v.spots.pitch_um == 100
    assert v.meta["um_per_unit"] == pytest.approx(55 / json.loads(
        (c2_visium[0] / "spatial" / "scalefactors_json.json").read_text())["spot_diameter_fullres"])


# ---------------------------------------------------------------------------------------------- AnnData + image
@pytest.fixture(scope="module")
def c2_h5ad(c2_visium, tmp_path_factory):
    """The C2 spots as scanpy.read_visium keeps them: PNG images as float32 in [0, 1], the scale factors."""
    outs, reference = c2_visium
    factors, coords, images = _c2_parts(outs, reference)
    adata = ad.AnnData(X=reference.spots.counts.astype(np.float32), obs=pd.DataFrame(index=list(reference.spots.ids)),
                       var=pd.DataFrame(index=reference.genes))
    adata.obsm["spatial"] = coords
    adata.uns["spatial"] = {"C2": {"images": {k: (a / 255.0).astype(np.float32) for k, a in images.items()},
                                   "scalefactors": factors, "metadata": {}}}
    path = tmp_path_factory.mktemp("h5ad") / "c2.h5ad"
    adata.write_h5ad(path)
    return path


def test_anndata_with_its_image(c2_visium, c2_h5ad):
    _, reference = c2_visium
    assert detect_platform(c2_h5ad) == "anndata"
    a = read_sample(c2_h5ad, spot_diameter_um=100, pitch_um=200)  # no image given: the one it carries
    assert a.meta["image_kind"] == "hires" and a.meta["library_id"] == "C2"
    assert a.genes == reference.genes and (a.spots.counts != reference.spots.counts).nnz == 0
    np.testing.assert_allclose(a.spots.xy_um, reference.spots.xy_um, atol=1e-6)
    np.testing.assert_allclose(a.image.to_px(a.spots.xy_um), reference.image.to_px(reference.spots.xy_um), atol=1e-6)
    assert a.image.pixel_size_um == pytest.approx(reference.image.pixel_size_um)
    assert a.image.dtype == np.uint8  # [0, 1] floats back to 8 bits
    np.testing.assert_array_equal(a.image.read_px(500, 500, 20, 20), reference.image.read_px(500, 500, 20, 20))
    # A given full-resolution pixel size: the spots' diameter follows from spot_diameter_fullres.
    b = read_anndata(c2_h5ad, pixel_size_um=reference.meta["um_per_fullres_px"])
    assert b.spots.diameter_um == pytest.approx(100) and b.spots.pitch_um == 200
    np.testing.assert_allclose(b.spots.xy_um, reference.spots.xy_um, atol=1e-6)
    # Default: Visium's 55 µm spots give the pixel size.
    c = read_anndata(c2_h5ad)
    assert c.meta["um_per_fullres_px"] == pytest.approx(55 / c.meta["scalefactors"]["spot_diameter_fullres"])


def test_anndata_image_errors(c2_h5ad, tmp_path):
    adata = ad.read_h5ad(c2_h5ad)
    plain = adata.copy()
    del plain.uns["spatial"]
    with pytest.raises(InputError, match=r"carries no image .*pass image= \(--image\).*pixel_size_um= \(--pixel-size\)"):
        read_anndata(plain)
    no_scale = adata.copy()
    no_scale.uns["spatial"]["C2"]["scalefactors"] = {"tissue_hires_scalef": 0.2}
    with pytest.raises(GeometryError, match=r"neither microns_per_pixel nor spot_diameter_fullres. Pass pixel_size_um "
                                            r"\(--pixel-size\)"):
        read_anndata(no_scale)
    assert read_anndata(no_scale, pixel_size_um=0.69).meta["um_per_fullres_px"] == 0.69
    no_factor = adata.copy()
    del no_factor.uns["spatial"]["C2"]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(InputError, match=r"lacks tissue_hires_scalef"):
        read_anndata(no_factor)
    two = adata.copy()
    two.uns["spatial"]["C3"] = two.uns["spatial"]["C2"]
    with pytest.raises(InputError, match=r"2 libraries with images \['C2', 'C3'\]; pass library_id="):
        read_anndata(two)
    assert read_anndata(two, library_id="C3", spot_diameter_um=100, pitch_um=200).meta["library_id"] == "C3"


# ---------------------------------------------------------------------------------------------- bad stores
def test_bad_stores(tmp_path):
    image_tf, points_tf = _xenium_frames("pixels")
    points, _ = _example_points({"global": points_tf})
    only_image = _write(sd.SpatialData(images={"morphology_focus": _example_image({"global": image_tf})}),
                        tmp_path / "image_only.zarr")
    with pytest.raises(InputError, match=r"holds no expression to read: no table of counts and no points element"):
        read_spatialdata(only_image)

    two_points = _write(sd.SpatialData(points={"transcripts": points, "transcripts_copy": points},
                                       images={"morphology_focus": _example_image({"global": image_tf})}),
                        tmp_path / "two_points.zarr")
    with pytest.raises(InputError, match=r"holds 2 points elements \['transcripts', 'transcripts_copy'\]; pick one "
                                         r"with points= .*--input STORE/points/NAME"):
        read_spatialdata(two_points)
    assert read_sample(two_points / "points" / "transcripts_copy").meta["points_element"] == "transcripts_copy"

    two_images = _write(sd.SpatialData(points={"transcripts": points},
                                       images={"dapi": _example_image({"global": image_tf}),
                                               "stain": _example_image({"global": image_tf})}),
                        tmp_path / "two_images.zarr")
    with pytest.raises(InputError, match=r"holds 2 images that fit .*\['dapi', 'stain'\]; pick one with image= "
                                         r"\(read_spatialdata\) or --image NAME"):
        read_spatialdata(two_images)
    assert read_spatialdata(two_images, image="stain").meta["image_element"] == "stain"
    result = runner.invoke(app, ["prepare", str(two_images), "--out", str(tmp_path / "p"), "--image", "dapi",
                                 "--n-genes", "3", "--train-stride", "200"])
    assert result.exit_code == 0, result.output

    apart = _write(sd.SpatialData(points={"transcripts": points},
                                  images={"morphology_focus": _example_image({"aligned": image_tf})}),
                   tmp_path / "apart.zarr")
    with pytest.raises(InputError, match=r"No image .* shares a coordinate system with the expression element "
                                         r"'transcripts' \(which is in \['global'\]; images: \{'morphology_focus': "
                                         r"\['aligned'\]\}\).*set_transformation"):
        read_spatialdata(apart)

    with pytest.raises(InputError, match=r"not a SpatialData store"):
        read_spatialdata(tmp_path / "image_only.zarr" / "images")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match=r"Cannot tell the platform .*SpatialData \.zarr store"):
        detect_platform(tmp_path / "empty.zarr")


def test_polygons_without_scale_need_pixel_size(hd_store, tmp_path):
    store, truth = hd_store
    sdata = sd.read_zarr(store)
    table = sdata.tables["square_008um"]
    shapes = sdata.shapes["crop_square_008um"]
    # The same bins under a name that says nothing of their size: the scale must be given.
    table.uns["spatialdata_attrs"]["region"] = "bins"
    table.obs["region"] = pd.Categorical(["bins"] * table.n_obs)
    plain = _write(sd.SpatialData(images={"crop_full_image": sdata.images["crop_full_image"]},
                                  shapes={"bins": shapes}, tables={"table": table}), tmp_path / "plain.zarr")
    with pytest.raises(GeometryError, match=r"Cannot tell the micron scale of the shapes 'bins'.*Pass pixel_size_um "
                                            r"\(--pixel-size\)"):
        read_spatialdata(plain)
    s = read_spatialdata(plain, pixel_size_um=EXAMPLE_PX)
    assert s.spots.diameter_um == pytest.approx(8.0) and s.spots.pitch_um is None
    np.testing.assert_allclose(s.spots.xy_um, truth[8][2] * EXAMPLE_PX, atol=1e-6)
