"""Bounded memory on the reading side: streamed transcripts, JPEG decoded at the scale needed, tiles written as made.

Each result is compared with an independent computation (pandas on the whole file, PIL's full decode,
``np.save`` of tiles rebuilt one by one), so the streaming versions can only pass by giving the same answer.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import diffst.io.xenium as xenium
from conftest import XENIUM_ORIGIN_UM
from diffst.core.geometry import spot_pitch_geometry, tile_preset
from diffst.core.image import SlideImage
from diffst.data.normalise import LogScaleNormaliser
from diffst.data.prepare import SplitSpec, _NpyAppender, load_meta, prepare_dataset
from diffst.data.tiling import PointIndex, bin_points, make_tile, tile_expression
from diffst.errors import GeometryError, InputError
from diffst.example import EXAMPLE_TEST_REGION, load_example
from diffst.io import read_xenium
from diffst.io.xenium import CONTROL_PREFIXES, read_transcripts
from diffst.testing.spots import spots_from_transcripts


# ---------------------------------------------------------------------------------------------- transcripts
@pytest.fixture(scope="module")
def crop_table(xenium_crop) -> pd.DataFrame:
    return xenium_crop.table()


def _expected(table: pd.DataFrame, min_qv: float = 20.0) -> tuple[list[str], np.ndarray, pd.DataFrame]:
    """What the reader must keep, computed on the whole table with plain pandas."""
    names = table["feature_name"].astype(str)
    keep = (pd.to_numeric(table["qv"]) >= min_qv) & ~names.str.startswith(CONTROL_PREFIXES)
    kept = table[keep.to_numpy()]
    codes, genes = pd.factorize(kept["feature_name"].astype(str), sort=True)
    return list(genes), codes, kept


@pytest.mark.parametrize("chunk_rows", [7919, 10**9])
def test_streamed_transcripts_equal_the_whole_table(crop_table, tmp_path, chunk_rows):
    table = crop_table.head(60_000).copy()
    table.loc[table.index[::50], "qv"] = 12.0  # some low quality, spread over every chunk
    table.loc[table.index[3::97], "feature_name"] = "NegControlProbe_ERCC-00002"
    path = tmp_path / "transcripts.csv.gz"
    table.to_csv(path, index=False)
    genes, codes, kept = _expected(table)
    got = read_transcripts(path, chunk_rows=chunk_rows)
    assert list(got.columns) == ["feature_name", "x_um", "y_um", "overlaps_nucleus"]
    assert list(got["feature_name"].cat.categories) == genes
    np.testing.assert_array_equal(got["feature_name"].cat.codes.to_numpy(), codes)
    np.testing.assert_array_equal(got["x_um"].to_numpy(), kept["x_location"].to_numpy(np.float32))
    np.testing.assert_array_equal(got["y_um"].to_numpy(), kept["y_location"].to_numpy(np.float32))
    np.testing.assert_array_equal(got["overlaps_nucleus"].to_numpy(), kept["overlaps_nucleus"].to_numpy())
    assert got["x_um"].dtype == np.float32 and got["overlaps_nucleus"].dtype == np.int8
    # Through read_xenium: int16 gene codes into the sorted gene list, and ~11 bytes held per transcript.
    sample = read_xenium(path)
    tx = sample.transcripts
    assert sample.genes == genes and tx["gene"].dtype == np.int16
    np.testing.assert_array_equal(tx["gene"].to_numpy(), codes)
    assert tx.memory_usage(deep=True).sum() / len(tx) < 12


def test_parquet_in_batches_with_byte_names(crop_table, tmp_path, monkeypatch):
    """Xenium's Parquet stores feature_name as bytes in some versions; batches are read one at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = crop_table.head(30_000).copy()
    table.loc[table.index[::40], "qv"] = 3.0
    genes, codes, kept = _expected(table)
    arrow = pa.Table.from_pandas(table.assign(feature_name=table["feature_name"].astype(str).str.encode("utf-8")),
                                 preserve_index=False)
    pq.write_table(arrow, tmp_path / "transcripts.parquet", row_group_size=4000)
    monkeypatch.setattr(xenium, "CHUNK_ROWS", 3001)
    got = read_transcripts(tmp_path / "transcripts.parquet")
    assert list(got["feature_name"].cat.categories) == genes
    np.testing.assert_array_equal(got["feature_name"].cat.codes.to_numpy(), codes)
    np.testing.assert_array_equal(got["y_um"].to_numpy(), kept["y_location"].to_numpy(np.float32))


def test_errors_found_in_later_chunks_name_the_file_row(crop_table, tmp_path, monkeypatch):
    """Counts and the first bad data row are over the whole file, however it was chunked."""
    monkeypatch.setattr(xenium, "CHUNK_ROWS", 1000)
    path = tmp_path / "transcripts.csv.gz"
    table = crop_table.head(5000).astype({"x_location": object})
    table.loc[[2500, 4100], "x_location"] = "12,5"
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"Column 'x_location' of .* holds 2 non-numeric value\(s\) of 5000 rows, e\.g\. "
                       r"'12,5' in data row 2501"):
        read_transcripts(path)
    table = crop_table.head(5000).copy()
    table.loc[[3999, 4000], "y_location"] = np.nan
    table.loc[4500, "feature_name"] = None
    table.to_csv(path, index=False)
    with pytest.raises(GeometryError, match=r"empty, NaN or infinite in 2 of 5000 rows \(e\.g\. data row 4000\)"):
        read_transcripts(path)
    table.loc[[3999, 4000], "y_location"] = 300.0
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"1 row\(s\) have an empty feature_name \(e\.g\. data row 4501\)"):
        read_transcripts(path)
    table = crop_table.head(3000).copy()
    table["qv"] = 10.0
    table.loc[table.index[2000:], "qv"] = 30.0
    table.loc[table.index[2000:], "feature_name"] = "BLANK_0001"
    table.to_csv(path, index=False)
    assert len(read_transcripts(path, min_qv=5.0)) == 2000  # qv 10 kept, BLANK dropped
    with pytest.raises(InputError, match=r"No transcripts left in .*: 3000 rows read, 2000 removed by qv < min_qv "
                       r"\(20\.0\), 1000 more removed as control probes"):
        read_transcripts(path)


def test_float32_coordinates_bin_like_float64():
    """bin_points works in float64: a float32 coordinate lands in the bin its float64 value does."""
    rng = np.random.default_rng(0)
    x = (1000 + rng.uniform(0, 200, 50_000)).astype(np.float32)
    y = (200 + rng.uniform(0, 200, 50_000)).astype(np.float32)
    x[:100] = np.float32(1062.4)  # on (or within rounding of) a bin edge of the grid below
    gene = rng.integers(0, 3, 50_000)
    origin = (float(np.float32(1062.4)) - 20.0, 199.99)
    a = bin_points(gene, x, y, 3, origin, 10.0, (20, 20))
    b = bin_points(gene, x.astype(np.float64), y.astype(np.float64), 3, origin, 10.0, (20, 20))
    np.testing.assert_array_equal(a, b)
    assert a[:, :, 2].sum() >= 100  # the edge points went to the bin they start


def test_point_index_bands_give_the_counts_of_a_full_scan(xenium_sample):
    """The band index (built a chunk at a time) holds every transcript once; tiles read through it count the same."""
    sample = xenium_sample
    index = PointIndex(sample, band_um=7.0, chunk_rows=5003)  # chunks that cut bands, bands that cut HR bins
    tx = sample.transcripts
    assert index.starts[-1] == len(tx)
    bands = np.floor((index.y.astype(np.float64) - index.y_min) / 7.0)
    assert np.all(np.diff(bands) >= 0)
    stored = pd.DataFrame({"gene": index.gene, "x": index.x, "y": index.y}).sort_values(["gene", "x", "y"])
    whole = pd.DataFrame({"gene": tx["gene"], "x": tx["x_um"], "y": tx["y_um"]}).sort_values(["gene", "x", "y"])
    np.testing.assert_array_equal(stored.to_numpy(), whole.to_numpy())
    geom = tile_preset("cpu", 5)
    genes = sample.gene_indices(sample.genes[:6])
    x0, y0, x1, y1 = sample.extent_um()
    rng = np.random.default_rng(2)
    for x, y in [(x0, y0 - geom.tile_um / 2), (x0, y1 - 3.0), (x0, y1 + 5.0)] + list(zip(
            rng.uniform(x0 - 20, x1 - 20, 25), rng.uniform(y0 - 20, y1 - 20, 25), strict=True)):
        placed = geom.at(float(x), float(y))
        np.testing.assert_array_equal(tile_expression(sample, genes, placed, index=index)[0],
                                      tile_expression(sample, genes, placed)[0])


def test_read_xenium_of_the_crop_keeps_registration(xenium_sample):
    """The compact reader keeps what registration checks use: float32 microns, overlaps_nucleus as int8."""
    tx = xenium_sample.transcripts
    assert tx["x_um"].dtype == np.float32 and set(np.unique(tx["overlaps_nucleus"])) <= {0, 1}
    x0, y0, _, _ = xenium_sample.image.extent_um()
    assert (x0, y0) == pytest.approx(XENIUM_ORIGIN_UM)
    assert xenium_sample.check_placement()["given"] > 0.5


# ---------------------------------------------------------------------------------------------- JPEG
@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    """A 1203 x 1001 px RGB JPEG (sizes not multiples of 8) with a dark square at known pixels, and its full decode."""
    rng = np.random.default_rng(1)
    rows, cols = 1203, 1001
    yy, xx = np.mgrid[:rows, :cols]
    pixels = np.stack([200 + 40 * np.sin(xx / 23.0), 180 + 40 * np.cos(yy / 17.0), 210 + 0 * xx], axis=-1)
    pixels = pixels + rng.normal(0, 6, pixels.shape)
    pixels[400:480, 600:680] = 30  # dark square: columns 600-679, rows 400-479
    path = tmp_path_factory.mktemp("jpeg") / "he.jpg"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB"))
    return path, full


def test_jpeg_scales_are_exact_block_means_and_decoded_only_when_needed(jpeg):
    path, full = jpeg
    image = SlideImage(path, pixel_size_um=0.5)
    assert image.shape_px == (1203, 1001) and image.is_rgb
    levels = image._levels
    assert [lv.downsample for lv in levels] == [1, 2, 4, 8]
    assert [lv.shape[:2] for lv in levels] == [(1203, 1001), (602, 501), (301, 251), (151, 126)]
    assert all(lv._array is None for lv in levels[:3]), "opening decodes the 1/8 scale only"
    # 6 µm/px: the 1/4 scale (2 µm/px, 3 of its pixels per output pixel); full resolution never decoded.
    region = image.read_region_um(100.0, 100.0, 360.0, 240.0, 6.0)
    assert levels[0]._array is None and levels[1]._array is None and levels[2]._array is not None
    reference = SlideImage(full, pixel_size_um=0.5).read_region_um(100.0, 100.0, 360.0, 240.0, 6.0)
    assert region.shape == reference.shape == (3, 40, 60)
    assert np.abs(region - reference).mean() < 0.02
    # Registration: the dark square (300-340 µm x 200-240 µm) is where the full-resolution image has it.
    centres = []
    for picture in (region, reference):
        darkness = 0.77 - picture.mean(axis=0)  # the background's mean brightness is 0.77
        weight = np.where(darkness > 0.2, darkness, 0.0)  # the square with its partly covered edge pixels
        rows, cols = np.mgrid[: weight.shape[0], : weight.shape[1]] + 0.5
        centres.append((100 + 6.0 * (weight * cols).sum() / weight.sum(), 100 + 6.0 * (weight * rows).sum() / weight.sum()))
    assert centres[0] == pytest.approx((320.0, 220.0), abs=0.6)  # a tenth of an output pixel
    assert centres[0] == pytest.approx(centres[1], abs=0.3)
    # A k x k block mean, blocks aligned at pixel (0, 0).
    for level in levels[1:]:
        k = level.downsample
        h, w = (full.shape[0] // k) * k, (full.shape[1] // k) * k
        block = full[:h, :w].astype(np.float32).reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))
        assert np.abs(level.decode()[: h // k, : w // k] - block).mean() < 1.5
    # Finer than the file: the full resolution, exactly PIL's decode.
    image.read_region_um(300.0, 200.0, 40.0, 40.0, 0.25)
    np.testing.assert_array_equal(levels[0].decode(), full)


def test_jpeg_grayscale_and_truncated(jpeg, tmp_path):
    path, full = jpeg
    gray = tmp_path / "gray.jpg"
    Image.fromarray(full[..., 1]).save(gray, quality=95)
    image = SlideImage(gray, pixel_size_um=1.0)
    assert image.n_channels == 1 and image.shape_px == (1203, 1001)
    assert image.read_region_um(0, 0, 400, 400, 10.0).shape == (1, 40, 40)
    with Image.open(gray) as im:
        np.testing.assert_array_equal(image.read_px(0, 0, 1203, 1001)[..., 0], np.asarray(im))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.8)])
    with pytest.raises(InputError, match=r"Cannot decode image .*cut\.jpg: image file is truncated"):
        SlideImage(cut, pixel_size_um=0.5)


# ---------------------------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("max_rows", [5, 10**100])
def test_npy_appender_writes_what_np_save_writes(tmp_path, max_rows, monkeypatch):
    monkeypatch.setattr(_NpyAppender, "shift_step", 7)  # the data move in many small steps
    rng = np.random.default_rng(0)
    for dtype, shape in ((np.float32, (3, 4, 4)), (bool, (5, 5)), (np.uint8, (2, 1, 6, 6))):
        rows = [(rng.random(shape) * 100).astype(dtype) for _ in range(5)]
        appender = _NpyAppender(tmp_path / "a.npy", dtype, shape, max_rows)
        for row in rows:
            appender.add(row)
        appender.close()
        buffer = io.BytesIO()
        np.save(buffer, np.stack(rows))
        assert (tmp_path / "a.npy").read_bytes() == buffer.getvalue()
        assert appender._reserved > len(appender._header(5)) or max_rows == 5


def _check_against_tiles(folder, samples, self_supervised=False):
    """Rebuild every tile of a prepared dataset with make_tile and compare with the files, byte for byte."""
    meta = load_meta(folder)
    tiles = pd.read_csv(folder / "tiles.csv")
    geometry = tile_preset("cpu", 5) if not self_supervised else spot_pitch_geometry(samples[0], 2)
    by_name = {s.name: s for s in samples}
    fitted = None
    for which, group in tiles.groupby("split", sort=False):
        made = [make_tile(by_name[r.sample], by_name[r.sample].gene_indices(meta["genes"]), geometry.at(r.x0_um, r.y0_um),
                          self_supervised) for r in group.itertuples()]
        arrays = {"lr_counts": np.stack([t.lr_counts for t in made]).astype(np.float32),
                  "lr_mask": np.stack([t.lr_mask for t in made]),
                  "tissue": np.stack([t.tissue for t in made]), "cells": np.stack([t.cells for t in made]),
                  "cell_entropy": np.stack([t.cell_entropy for t in made])}
        if meta["has_hr"]:
            arrays["hr_counts"] = np.stack([t.hr_counts for t in made]).astype(np.float32)
            arrays["hr_mask"] = np.stack([t.measured_hr() for t in made]).astype(bool)
        assert sorted(p.name for p in (folder / which).iterdir()) == sorted(f"{k}.npy" for k in arrays)
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            assert (folder / which / f"{name}.npy").read_bytes() == buffer.getvalue(), (which, name)
        if which == meta["normaliser_fitted_on"]:
            scale = meta["geometry"]["scale"]
            fitted = arrays["hr_counts"] if meta["has_hr"] else arrays["lr_counts"] / float(scale**2)
    assert meta["normaliser"] == LogScaleNormaliser.fit(fitted, meta["genes"]).model_dump()
    assert meta["n_tiles"] == {k: int((tiles["split"] == k).sum()) for k in ("train", "val", "test")}


def test_prepared_example_equals_tiles_made_one_by_one(prepared):
    _check_against_tiles(prepared, [load_example()])


def test_prepared_spots_three_splits_and_self_supervised_equal_tiles_made_one_by_one(tmp_path):
    spots = spots_from_transcripts(load_example(), pitch_um=100.0, diameter_um=55.0)
    other = spots_from_transcripts(load_example(), pitch_um=100.0, diameter_um=55.0, name="other")
    out = prepare_dataset([spots, other], tmp_path / "spots", tile_preset("cpu", 5), n_genes=6, preview=False,
                          split=SplitSpec(val_region=(1062, 212, 1265, 527), test_samples=["other"]), progress=False)
    assert all(v > 0 for v in load_meta(out)["n_tiles"].values())
    _check_against_tiles(out, [spots, other])
    out = prepare_dataset([spots], tmp_path / "ss", spot_pitch_geometry(spots, 2), n_genes=6, preview=False,
                          self_supervised=True, progress=False)
    _check_against_tiles(out, [spots], self_supervised=True)


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """Tiles already written live in the temporary folder: a failure removes it and the parents it made."""
    import diffst.data.prepare as prepare

    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("disk full")
        return make_tile(*args, **kwargs)

    monkeypatch.setattr(prepare, "make_tile", failing)
    target = tmp_path / "new" / "deeper" / "prep"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset([load_example()], target, tile_preset("cpu", 5), n_genes=4, progress=False,
                        split=SplitSpec(test_region=EXAMPLE_TEST_REGION))
    assert calls["n"] == 6 and list(tmp_path.iterdir()) == []
    # An existing dataset survives a failed overwrite untouched.
    monkeypatch.setattr(prepare, "make_tile", make_tile)
    done = prepare_dataset([load_example()], tmp_path / "p", tile_preset("cpu", 5), n_genes=4, progress=False,
                           preview=False, split=SplitSpec(test_region=EXAMPLE_TEST_REGION))
    before = {str(p.relative_to(done)): p.read_bytes() for p in done.rglob("*") if p.is_file()}
    calls["n"] = 0
    monkeypatch.setattr(prepare, "make_tile", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset([load_example()], done, tile_preset("cpu", 5), n_genes=4, progress=False, overwrite=True,
                        split=SplitSpec(test_region=EXAMPLE_TEST_REGION))
    assert {str(p.relative_to(done)): p.read_bytes() for p in done.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert json.loads((done / "dataset.json").read_text())["format"] == "diffst-prepared"
