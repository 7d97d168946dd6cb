"""Reader-level bad inputs: each test writes a real file in a real format and checks the message a user sees."""

import logging
import re
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.transform import AffineTransform, warp
from typer.testing import CliRunner

from conftest import XENIUM_ORIGIN_UM, XeniumCrop
from diffst.cli import app
from diffst.core.image import SlideImage
from diffst.core.sample import Sample
from diffst.errors import GeometryError, InputError
from diffst.example import EXAMPLE_DIR, EXAMPLE_ORIGIN_UM, load_example
from diffst.io import read_anndata, read_xenium

EXAMPLE_TX = EXAMPLE_DIR / "transcripts.parquet"
EXAMPLE_TIF = EXAMPLE_DIR / "morphology_mip.ome.tif"


@pytest.fixture(scope="module")
def crop_table(xenium_crop) -> pd.DataFrame:
    """The real crop's transcripts in Xenium's column layout."""
    return xenium_crop.table()


@pytest.fixture()
def small_tx(crop_table, tmp_path):
    """A 200-row Xenium transcripts.csv.gz of the crop (lies on the crop image)."""
    path = tmp_path / "small" / "transcripts.csv.gz"
    path.parent.mkdir()
    crop_table.head(200).to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------ 1. pixel size and placement
def test_pixel_size_disagreeing_with_ome_metadata(caplog):
    kw = {"image": EXAMPLE_TIF, "image_origin_um": EXAMPLE_ORIGIN_UM}
    with pytest.raises(GeometryError, match=r"pixel_size_um \(--pixel-size\) 0\.85 disagrees with the OME metadata of "
                       r".*morphology_mip\.ome\.tif, PhysicalSizeX = 0\.425 µm\. Omit --pixel-size to use the metadata; "
                       r"if the metadata is wrong, pass force_pixel_size=True to read_xenium\."):
        read_xenium(EXAMPLE_TX, pixel_size_um=0.85, **kw)
    assert read_xenium(EXAMPLE_TX, pixel_size_um=0.4275, **kw).image.pixel_size_um == 0.4275  # within 1 %
    with caplog.at_level(logging.WARNING):
        forced = read_xenium(EXAMPLE_TX, pixel_size_um=0.85, force_pixel_size=True, **kw)
    assert forced.image.pixel_size_um == 0.85
    assert "Using 0.85 µm/px as forced (force_pixel_size=True)" in caplog.text
    assert "does not line up with its transcripts" in caplog.text  # the placement check only warns when forced


def test_placement_check_passes_on_real_data_and_is_cheap(xenium_sample):
    for sample in (xenium_sample, load_example()):
        start = time.perf_counter()
        scores = sample.check_placement()
        assert time.perf_counter() - start < 1.0
        assert scores["given"] > 0.5
        assert max(scores, key=scores.get) == "given", scores


# Sizes users confuse with the crop's true 0.2125 µm/px (full resolution); scaled by the same factor as the
# image when the crop is the packaged 2x downsampled one (0.425 µm/px), so every ratio below stays the same.
WRONG_PIXEL_SIZES = [0.5, 0.425, 0.65, 1.0, 0.1]


@pytest.mark.parametrize("wrong_at_full_res", WRONG_PIXEL_SIZES)
def test_wrong_pixel_size_on_real_crop_is_caught_and_the_right_one_named(wrong_at_full_res, xenium_crop, caplog):
    true = xenium_crop.pixel_size_um  # 0.2125 (shared) or 0.425 (packaged)
    pixel_size = wrong_at_full_res * xenium_crop.downsampling
    true_re = re.escape(f"{true:g}")
    kw = {"image_origin_um": XENIUM_ORIGIN_UM, "pixel_size_um": pixel_size}
    if pixel_size < true:  # the transcripts overshoot the image: caught before the placement check
        with pytest.raises(GeometryError, match=r"\d+% of the transcripts .* fall outside its image.*Likely cause: the "
                           r"data span 2\.\d+x the image, so the pixel size is too small; pixel_size_um \(--pixel-size\) "
                           rf"of about {re.escape(f'{true:g}'[:4])}\d* would fit"):
            read_xenium(xenium_crop.folder, **kw)
        return
    with pytest.raises(GeometryError) as caught:
        read_xenium(xenium_crop.folder, **kw)
    message = str(caught.value)
    assert re.fullmatch(
        r"The image of sample xenium_breast_crop does not line up with its transcripts: image intensity follows "
        rf"transcript density with r = -?0\.\d\d at the given placement \({pixel_size:g} µm/px, top-left corner at "
        r"\(1062\.0, 212\.0\) µm\) but r = 0\.\d\d with pixel size x0\.\d+ \(same top-left corner\)\. The pixel size "
        rf"looks wrong; the image fits best at about (0\.\d+) µm/px, close to {true_re} µm/px of {xenium_crop.kind} Xenium "
        rf"morphology image: try pixel_size_um \(--pixel-size\) {true_re}\. If the placement is right, pass "
        r"--force-pixel-size \(CLI\) or force_pixel_size=True \(read_xenium\) to only warn\.", message), message
    factor = float(re.search(r"with pixel size x(0\.\d+)", message).group(1))
    fitted = float(re.search(r"fits best at about (0\.\d+) µm/px", message).group(1))
    assert abs(fitted / true - 1) < 0.05 and abs(pixel_size * factor / true - 1) < 0.05, message
    with caplog.at_level(logging.WARNING, logger="diffst.data"):  # forced: the same finding, as a warning
        sample = read_xenium(xenium_crop.folder, force_pixel_size=True, **kw)
    assert sample.image.pixel_size_um == pixel_size
    assert "does not line up with its transcripts" in caplog.text
    assert f"try pixel_size_um (--pixel-size) {true:g}" in caplog.text


def test_wrong_pixel_size_is_refused_by_the_cli(xenium_crop, tmp_path):
    out = tmp_path / "prepared"
    wrong = 0.5 * xenium_crop.downsampling  # 0.5 against the full-resolution 0.2125: pixel size x0.425
    result = CliRunner().invoke(app, ["prepare", str(xenium_crop.folder), "--image-origin", "1062,212", "--pixel-size",
                                      f"{wrong:g}", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert re.search(r"does not line up with its transcripts.*with pixel size x0\.4\d+ .*try pixel_size_um "
                     rf"\(--pixel-size\) {re.escape(f'{xenium_crop.pixel_size_um:g}')}\. If the placement is right, "
                     r"pass --force-pixel-size \(CLI\)", " ".join(result.output.split())), result.output


def test_placement_search_finds_the_pixel_size_on_a_3_mm_slide():
    """A scale error moves far transcripts more on a large slide: the search refines on finer bins."""
    sample = load_example()  # 0.425 µm/px; mirrored 5 x 5 into a 2.5 x 1.9 mm slide
    pixels = np.asarray(sample.image.overview(max_side=10_000))[..., 0]
    rows, cols = pixels.shape
    slide = np.block([[pixels[:: -1 if i % 2 else 1, :: -1 if j % 2 else 1] for j in range(5)] for i in range(5)])
    x = sample.transcripts["x_um"].to_numpy() - EXAMPLE_ORIGIN_UM[0]
    y = sample.transcripts["y_um"].to_numpy() - EXAMPLE_ORIGIN_UM[1]
    w, h = cols * 0.425, rows * 0.425
    rng = np.random.default_rng(0)
    parts = []
    for i in range(5):
        for j in range(5):
            keep = rng.random(len(x)) < 0.2
            parts.append(sample.transcripts[keep].assign(x_um=(x if j % 2 == 0 else w - x)[keep] + j * w,
                                                         y_um=(y if i % 2 == 0 else h - y)[keep] + i * h))
    table = pd.concat(parts, ignore_index=True)
    for pixel_size in (0.425, 0.4, 0.5):  # right, 6 % and 18 % off
        big = Sample("slide", sample.genes, SlideImage(slide, pixel_size_um=pixel_size), table, platform="xenium")
        if pixel_size == 0.425:
            start = time.perf_counter()
            scores = big.check_placement()
            assert time.perf_counter() - start < 1.0 and max(scores, key=scores.get) == "given", scores
            continue
        with pytest.raises(GeometryError, match=r"the image fits best at about 0\.4[123]\d* µm/px, close to 0\.425 µm/px "
                           r"of a 2x downsampled Xenium morphology image: try pixel_size_um \(--pixel-size\) 0\.425\."):
            big.check_placement()


def _he_from_dapi(tmp_path, crop: XeniumCrop):
    """A real RGB H&E-like TIFF made from the crop's DAPI (dark nuclei, white glass) and its Xenium-style
    alignment CSV: H&E at 0.5 µm/px, rotated by 4 degrees relative to the morphology image."""
    dapi = tifffile.imread(crop.image).astype(np.float32)
    dapi = np.clip(dapi / np.percentile(dapi, 99), 0, 1)
    rows, cols = dapi.shape
    a, s = np.deg2rad(4), 0.5 / crop.pixel_size_um
    matrix = np.array([[s * np.cos(a), -s * np.sin(a), 0], [s * np.sin(a), s * np.cos(a), 0], [0, 0, 1]])
    corners = np.linalg.inv(matrix) @ np.array([[0, cols, 0, cols], [0, 0, rows, rows], [1, 1, 1, 1]])
    lo, hi = corners[:2].min(axis=1) - 20, corners[:2].max(axis=1) + 20
    matrix[:2, 2] = matrix[:2, :2] @ lo
    w, h = (hi - lo).astype(int)
    he = warp(dapi, AffineTransform(matrix=matrix), output_shape=(h, w), order=1, cval=-1)
    rgb = np.stack([235 - 150 * he, 200 - 170 * he, 225 - 80 * he], axis=-1)
    rgb[he < 0] = 250
    tifffile.imwrite(tmp_path / "he.ome.tif", rgb.astype(np.uint8), photometric="rgb")
    np.savetxt(tmp_path / "he_imagealignment.csv", matrix, delimiter=",")
    return tmp_path / "he.ome.tif", matrix


def test_he_alignment_passes_and_wrong_alignment_is_caught(xenium_crop, tmp_path):
    he, matrix = _he_from_dapi(tmp_path, xenium_crop)
    kw = {"image_origin_um": XENIUM_ORIGIN_UM, "he_image": he, "use_he": True, **xenium_crop.read_kw}
    sample = read_xenium(xenium_crop.folder, he_alignment=tmp_path / "he_imagealignment.csv", **kw)
    assert sample.image.is_rgb and sample.check_placement()["given"] > 0.5
    with pytest.raises(GeometryError, match=r"does not line up with its transcripts.*with pixel size x0\.(4[6-9]|5[0-4])\d* "
                       r"\(same top-left corner\)\. The image's alignment matrix \(he_alignment for an H&E image\) looks "
                       r"wrong\. If the placement is right, pass --force-pixel-size"):
        read_xenium(xenium_crop.folder, he_alignment=matrix @ np.diag([2.0, 2.0, 1.0]), **kw)


# ------------------------------------------------------------------------------ 2. coordinates off the image
def test_transcripts_outside_the_image_are_counted(crop_table, xenium_crop, tmp_path, caplog):
    table = crop_table.copy()
    table.loc[::100, "x_location"] = -5.0  # 1 % negative coordinates
    path = tmp_path / "transcripts.parquet"
    table.to_parquet(path)
    with caplog.at_level(logging.WARNING, logger="diffst.data"):
        sample = read_xenium(path, image=xenium_crop.image, image_origin_um=XENIUM_ORIGIN_UM, **xenium_crop.read_kw)
    assert len(sample.transcripts) == len(table) == 186146
    assert ("1862 of 186146 transcripts (1.00%) of sample " f"{tmp_path.name} fall outside its image (1862 with negative "
            "coordinates); they are dropped when tiling.") in caplog.text
    caplog.clear()
    sample.check_registration()  # prepare_dataset checks again: no second warning
    assert "fall outside" not in caplog.text

    table = crop_table.copy()
    table["x_location"] -= 300.0  # most of them left of the image: a wrong crop origin
    table.to_parquet(path)
    with pytest.raises(GeometryError, match=r"\d+% of the transcripts .* fall outside its image.*Likely cause: the data "
                       r"would fit in the image but start at \(762, 212\) µm and the image at \(1062, 212\) µm, so the "
                       r"image origin is off"):
        read_xenium(path, image=xenium_crop.image, image_origin_um=XENIUM_ORIGIN_UM, **xenium_crop.read_kw)


# ------------------------------------------------------------------------------ 3. non-numeric columns
def test_non_numeric_columns_are_named(crop_table, xenium_crop, tmp_path):
    table = crop_table.head(2000).astype({"x_location": object, "qv": object})
    table.loc[[5, 9, 11], "x_location"] = "1,234.5"
    table.loc[20, "x_location"] = "n/a"  # pandas reads it as missing
    path = tmp_path / "transcripts.csv.gz"
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"Column 'x_location' of .*transcripts\.csv\.gz holds 3 non-numeric value\(s\) "
                       r"of 2000 rows, e.g\. '1,234\.5' in data row 6; expected numbers"):
        read_xenium(path, image=xenium_crop.image, image_origin_um=XENIUM_ORIGIN_UM, **xenium_crop.read_kw)
    table.loc[[5, 9, 11], "x_location"] = 1100.0
    table.to_csv(path, index=False)
    with pytest.raises(GeometryError, match=r"x_location / y_location of .* are empty, NaN or infinite in 1 of 2000 rows "
                       r"\(e\.g\. data row 21\)"):
        read_xenium(path, image=xenium_crop.image, image_origin_um=XENIUM_ORIGIN_UM, **xenium_crop.read_kw)
    table = crop_table.head(2000).astype({"qv": object})
    table.loc[7, "qv"] = "high"
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"Column 'qv' of .* holds 1 non-numeric value\(s\) of 2000 rows, e.g\. 'high'"):
        read_xenium(path, image=xenium_crop.image, image_origin_um=XENIUM_ORIGIN_UM, **xenium_crop.read_kw)


def test_empty_gene_name(crop_table, xenium_crop, tmp_path):
    table = crop_table.head(50).copy()
    table.loc[2, "feature_name"] = None
    path = tmp_path / "transcripts.csv.gz"
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"1 row\(s\) have an empty feature_name \(e\.g\. data row 3\)"):
        read_xenium(path, image=xenium_crop.image, image_origin_um=XENIUM_ORIGIN_UM, **xenium_crop.read_kw)


# ------------------------------------------------------------------------------ 4. nothing to read
def test_empty_or_fully_filtered_transcripts(crop_table, tmp_path):
    path = tmp_path / "transcripts.csv.gz"
    crop_table.head(0).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"transcripts\.csv\.gz holds no transcripts \(0 rows below the header\)"):
        read_xenium(path)
    table = crop_table.head(3).copy()
    table["qv"] = [10.0, 15.0, 30.0]
    table.loc[2, "feature_name"] = "NegControlProbe_ERCC-00002"
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"No transcripts left in .*: 3 rows read, 2 removed by qv < min_qv \(20\.0\), 1 "
                       r"more removed as control probes .*Lower the keyword min_qv of read_xenium \(the diffst prepare "
                       r"command line has no option for it and uses 20\)"):
        read_xenium(path)


# ------------------------------------------------------------------------------ 5. damaged TIFF
def test_truncated_or_corrupt_tiff_is_refused_on_open(tmp_path, small_tx, xenium_crop):
    pixels = np.random.default_rng(0).integers(0, 4000, (512, 512)).astype(np.uint16)
    path = tmp_path / "trunc.tif"
    tifffile.imwrite(path, pixels, tile=(128, 128), compression="zlib")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    with pytest.raises(InputError, match=r"Cannot read image .*trunc\.tif: the file is truncated \([\d,]+ bytes, but its "
                       r"pixel data run to [\d,]+ bytes\)\. Copy or export the image again\."):
        SlideImage(path, pixel_size_um=0.5)
    # The real crop image cut short, read through the Xenium reader.
    cut = tmp_path / "morphology_mip.tif"
    cut.write_bytes(xenium_crop.image.read_bytes()[: int(xenium_crop.image.stat().st_size * 0.7)])
    with pytest.raises(InputError, match=r"Cannot read image .*morphology_mip\.tif: the file is truncated"):
        read_xenium(small_tx, image=cut, image_origin_um=XENIUM_ORIGIN_UM, **xenium_crop.read_kw)
    # Same size but its last tile overwritten: found by decoding the far corner.
    bad = tmp_path / "corrupt.tif"
    tifffile.imwrite(bad, pixels, tile=(128, 128), compression="zlib")
    with tifffile.TiffFile(bad) as tif:
        offset, count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    data = bytearray(bad.read_bytes())
    data[offset : offset + count] = b"\xff" * count
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"Cannot read image .*corrupt\.tif: decoding its last strip / tile failed"):
        SlideImage(bad, pixel_size_um=0.5)


# ------------------------------------------------------------------------------ 6. other bad numbers
def test_invalid_ome_pixel_size(tmp_path, small_tx):
    path = tmp_path / "nan.ome.tif"
    tifffile.imwrite(path, np.ones((64, 64), np.uint16), ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.5})
    path.write_bytes(path.read_bytes().replace(b'PhysicalSizeX="0.5"', b'PhysicalSizeX="NaN"'))
    message = r"OME metadata of image .*nan\.ome\.tif has a PhysicalSizeX that is not a positive number\. Pass pixel_size_um"
    with pytest.raises(GeometryError, match=message):
        SlideImage(path)
    with pytest.raises(GeometryError, match=message):  # not silently Xenium's 0.2125
        read_xenium(small_tx, image=path, image_origin_um=XENIUM_ORIGIN_UM)
    assert SlideImage(path, pixel_size_um=0.5).pixel_size_um == 0.5


def test_nan_pixel_size_and_origin_name_the_keyword(small_tx, xenium_crop):
    kw = {"image": xenium_crop.image}
    for origin in ((1062.0, float("nan")), "1062,212", (1062.0,)):
        with pytest.raises(GeometryError, match=r"image_origin_um \(--image-origin\) must be two finite numbers x, y"):
            read_xenium(small_tx, image_origin_um=origin, **xenium_crop.read_kw, **kw)
    with pytest.raises(GeometryError, match=r"pixel_size_um \(--pixel-size\) must be a positive number of microns per "
                       r"pixel, got nan"):
        read_xenium(small_tx, image_origin_um=XENIUM_ORIGIN_UM, pixel_size_um=float("nan"), **kw)


def test_bad_he_alignment_file(tmp_path, small_tx, xenium_crop):
    kw = {"image": xenium_crop.image, "image_origin_um": XENIUM_ORIGIN_UM, "he_image": tmp_path / "he.tif",
          **xenium_crop.read_kw}
    text = tmp_path / "text.csv"
    text.write_text("a,b,c\n1,2,3\n4,5,6\n")
    singular = tmp_path / "singular.csv"
    np.savetxt(singular, np.zeros((3, 3)), delimiter=",")
    with pytest.raises(InputError, match=r"Cannot read the H&E alignment matrix .*text\.csv.*3 rows of 3 comma-separated"):
        read_xenium(small_tx, he_alignment=text, **kw)
    with pytest.raises(InputError, match=r"Cannot read the H&E alignment matrix .*missing\.csv"):
        read_xenium(small_tx, he_alignment=tmp_path / "missing.csv", **kw)
    with pytest.raises(InputError, match=r"must be an invertible 3 x 3 matrix of numbers"):
        read_xenium(small_tx, he_alignment=singular, **kw)


def _h5ad(tmp_path, name, n=40, coords=None):
    rng = np.random.default_rng(1)
    adata = ad.AnnData(rng.poisson(3, (n, 6)).astype(np.float32))
    adata.obsm["spatial"] = rng.uniform(10, 190, (n, 2)) if coords is None else coords
    adata.write_h5ad(tmp_path / name)
    return tmp_path / name


def test_anndata_bad_pixel_size_coordinates_and_empty(tmp_path):
    path = _h5ad(tmp_path, "ok.h5ad")
    for bad in (float("nan"), -0.5, 0.0):
        with pytest.raises(GeometryError, match=r"pixel_size_um \(--pixel-size\) must be a positive number"):
            read_anndata(path, None, bad)
    text = _h5ad(tmp_path, "text.h5ad", n=3, coords=np.array([["1", "a"], ["2", "3"], ["4", "5"]]))
    with pytest.raises(InputError, match=r"adata\.obsm\['spatial'\] holds non-numeric values \(.*'a'.*\); expected"):
        read_anndata(text, None, 1.0)
    inf = _h5ad(tmp_path, "inf.h5ad", n=3, coords=np.array([[1.0, np.inf], [2.0, 3.0], [4.0, 5.0]]))
    with pytest.raises(GeometryError, match=r"NaN or infinite coordinates for 1 observation"):
        read_anndata(inf, None, 1.0)
    empty = _h5ad(tmp_path, "empty.h5ad", n=0, coords=np.zeros((0, 2)))
    with pytest.raises(InputError, match=r"The AnnData empty has no observations"):
        read_anndata(empty, np.zeros((200, 200), np.uint8), 1.0)
