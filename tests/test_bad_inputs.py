"""Every bad input fails with a message that names the problem (geometry, images, Xenium, prepare)."""

import gzip
import shutil

import numpy as np
import pytest
import tifffile

from conftest import XENIUM_ORIGIN_UM
from diffst.core.geometry import TileGeometry, tile_preset
from diffst.core.image import SlideImage
from diffst.core.sample import Sample
from diffst.data.dataset import PreparedTiles
from diffst.data.prepare import SplitSpec, prepare_dataset
from diffst.errors import GeometryError, InputError
from diffst.io.xenium import read_xenium


def test_geometry_rejects_nonsense_values():
    with pytest.raises(GeometryError, match="hr_bin_um must be a positive"):
        TileGeometry(hr_bin_um=0, scale=10, tile_lr=2)
    with pytest.raises(GeometryError, match="scale"):
        TileGeometry(hr_bin_um=10, scale=0, tile_lr=2)
    with pytest.raises(GeometryError, match="coarser than the HR bin"):
        TileGeometry(hr_bin_um=10, scale=10, tile_lr=2, image_pixel_um=20)
    with pytest.raises(GeometryError, match="smaller than the tissue-level image"):
        TileGeometry(hr_bin_um=10, scale=5, tile_lr=1, image_pixel_um=1.0, tissue_px=256)
    with pytest.raises(GeometryError, match="Unknown tile preset"):
        tile_preset("huge", 10)
    g = tile_preset("paper", 10)
    assert (g.tile_hr, g.tile_lr, g.lr_bin_um, g.n_cell_patches, g.image_px) == (260, 26, 100.0, 256, 5200)
    assert tile_preset("paper", 5).tile_hr == 130
    with pytest.raises(GeometryError, match="without origin_um"):
        g.bounds_um()


def test_image_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="Image file not found"):
        SlideImage(tmp_path / "nope.tif", pixel_size_um=0.5)
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00garbage" * 10)
    with pytest.raises(InputError, match="Cannot read TIFF"):
        SlideImage(bad, pixel_size_um=0.5)
    jpg = tmp_path / "broken.jpg"
    jpg.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError, match="Cannot decode image"):
        SlideImage(jpg, pixel_size_um=0.5)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((10, 10), np.uint16))
    with pytest.raises(GeometryError, match="pixel size .* is unknown"):
        SlideImage(plain)
    with pytest.raises(GeometryError, match="positive number of microns per pixel"):
        SlideImage(plain, pixel_size_um=-1)


def test_ome_pixel_size_and_lazy_region(tmp_path):
    arr = (np.arange(400 * 600) % 5000).reshape(400, 600).astype(np.uint16)
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, arr, ome=True, tile=(64, 64), metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm"})
    img = SlideImage(path, origin_um=(100.0, 50.0))
    assert img.pixel_size_um == 0.25
    assert img.extent_um() == (100.0, 50.0, 250.0, 150.0)
    raw = img.read_px(10, 20, 5, 7)
    np.testing.assert_array_equal(raw[..., 0], arr[10:15, 20:27])
    region = img.read_region_um(110.0, 60.0, 10.0, 10.0, 0.25)  # exactly pixels rows 40-80, cols 40-80
    np.testing.assert_allclose(region[0] * img.intensity_max()[0], arr[40:80, 40:80], rtol=1e-4, atol=1)


def test_xenium_reader_errors(tmp_path):
    with pytest.raises(InputError, match="No transcripts.parquet or transcripts.csv.gz"):
        read_xenium(tmp_path)
    bad = tmp_path / "transcripts.csv.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00corrupt")
    with pytest.raises(InputError, match="Cannot read transcripts"):
        read_xenium(bad)
    wrong = tmp_path / "w" / "transcripts.csv.gz"
    wrong.parent.mkdir()
    with gzip.open(wrong, "wt") as f:
        f.write("gene,x,y\nA,1,2\n")
    with pytest.raises(InputError, match="lacks the Xenium column"):
        read_xenium(wrong)


def test_wrong_pixel_size_or_origin_is_caught(xenium_crop, tmp_path):
    # The classic mistake: forgetting the crop origin puts every transcript outside the image.
    with pytest.raises(GeometryError, match="fall outside its image.*pixel size"):
        read_xenium(xenium_crop.folder, **xenium_crop.read_kw)
    # A wrong pixel size (hires-vs-full-res style factor) shrinks the image under the data.
    with pytest.raises(GeometryError, match="outside its image"):
        read_xenium(xenium_crop.folder, image_origin_um=XENIUM_ORIGIN_UM, pixel_size_um=xenium_crop.pixel_size_um / 4)


def test_nan_and_negative_inputs(xenium_crop, tmp_path):
    table = xenium_crop.table(nrows=500)
    table.loc[3, "x_location"] = np.nan
    path = tmp_path / "transcripts.csv.gz"
    table.to_csv(path, index=False)
    with pytest.raises(GeometryError, match="NaN or infinite"):
        read_xenium(path)
    from diffst.core.sample import SpotTable

    with pytest.raises(InputError, match="negative values"):
        SpotTable(np.array([[1, -2]]), np.array([[0.0, 0.0]]), 55, 100, np.array(["a"]))
    with pytest.raises(InputError, match="NaN or infinite"):
        SpotTable(np.array([[1, np.nan]]), np.array([[0.0, 0.0]]), 55, 100, np.array(["a"]))
    with pytest.raises(InputError, match="expected \\(2, 2\\)"):
        SpotTable(np.ones((2, 3)), np.zeros((3, 2)), 55, 100, np.array(["a", "b"]))


def test_missing_genes_are_named(xenium_sample, tmp_path):
    with pytest.raises(InputError, match="lacks 2 requested gene.*NOT_A_GENE"):
        prepare_dataset([xenium_sample], tmp_path / "p", tile_preset("cpu", 10), genes=["ERBB2", "NOT_A_GENE", "FOO1"],
                        progress=False)
    assert not (tmp_path / "p").exists()


def test_image_smaller_than_tile_and_empty_tiles(xenium_sample, tmp_path):
    with pytest.raises(GeometryError, match="smaller than one 2600 µm tile"):
        prepare_dataset([xenium_sample], tmp_path / "p", tile_preset("paper", 10), progress=False)
    # A dark image (no tissue signal) and no transcripts in the chosen genes -> no tile has tissue.
    image = xenium_sample.image
    blank = SlideImage(np.zeros(image.shape_px, np.uint16), pixel_size_um=image.pixel_size_um, origin_um=XENIUM_ORIGIN_UM)
    tx = xenium_sample.transcripts
    empty = Sample("blank", xenium_sample.genes, blank, tx[tx["gene"] == xenium_sample.genes.index("ERBB2")], platform="xenium")
    with pytest.raises(InputError, match="No tile has tissue"):
        prepare_dataset([empty], tmp_path / "q", tile_preset("cpu", 10), genes=["KRT7"], progress=False)
    assert not (tmp_path / "q").exists()
    assert not list(tmp_path.glob(".q.partial*")), "nothing half-written on failure"


def test_unknown_split_sample_and_existing_output(xenium_sample, tmp_path):
    with pytest.raises(InputError, match="unknown sample"):
        prepare_dataset([xenium_sample], tmp_path / "p", tile_preset("cpu", 10), split=SplitSpec(test_samples=["C9"]),
                        progress=False)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a prepared dataset written by Diff-ST"):
        prepare_dataset([xenium_sample], tmp_path / "exists", tile_preset("cpu", 10), progress=False)


def test_corrupt_prepared_dataset(prepared_xenium, tmp_path):
    with pytest.raises(InputError, match="not a prepared Diff-ST dataset"):
        PreparedTiles(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(prepared_xenium, copy)
    (copy / "train" / "hr_counts.npy").write_bytes(b"broken")
    with pytest.raises(InputError, match="missing or corrupt"):
        PreparedTiles(copy, "train")
    with pytest.raises(InputError, match="has no 'val' tiles"):
        PreparedTiles(prepared_xenium, "val")
    (copy / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt"):
        PreparedTiles(copy, "test")


def test_mixed_image_kinds_are_refused_before_tiling(xenium_sample, tmp_path):
    from diffst.testing import synthetic_slide

    he = synthetic_slide(220, 220, n_genes=12, seed=0)
    with pytest.raises(InputError, match="mix images with \\[1, 3\\] channels"):
        prepare_dataset([xenium_sample, he], tmp_path / "p", tile_preset("cpu", 10), n_genes=2, progress=False)
    assert not (tmp_path / "p").exists()
