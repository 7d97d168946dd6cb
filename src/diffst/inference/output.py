"""Stitch per-tile predictions into one map per sample, band by band, and write them as AnnData.

Overlapping tiles are combined with running weighted sums over a band of HR-grid rows at a time (a band is
one tile high), so stitching holds a band of the slide (band x width x genes x layers) and the tiles that
touch it, never all tiles nor the whole grid. The bands feed either an in-memory AnnData
(:func:`build_anndata`, what :func:`diffst.inference.predict.to_anndata` returns) or an ``.h5ad`` written
as they come (:func:`write_h5ad_stream`), whose memory does not grow with the slide. Both give the same
table: the sums are taken tile by tile in the same order as :func:`diffst.inference.predict.stitch`.

The histology for ``uns['spatial']`` is rebuilt from the tiles' images at no finer a resolution than the
hires image needs (:func:`slide_histology`), also without holding the slide at full resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffst.errors import InputError
from diffst.inference.store import dataset_maps
from diffst.memory import release_memory, release_pages

OBS_COLUMNS = ("sample", "row", "col", "x_um", "y_um")


# -- where per-tile layers come from ----------------------------------------------------------------------
class MemoryTiles:
    """Per-tile layers held in memory (:class:`diffst.inference.predict.TilePredictions`)."""

    def __init__(self, preds):
        self.preds = preds
        self.num_samples = preds.num_samples
        self.bound_keys = sorted(preds.bounds)

    def get(self, i: int) -> dict[str, np.ndarray]:
        """Layers of tile ``i``: ``mean``, ``std`` and the interval bounds, (N, H, W) each."""
        return self.preds.tile_layers(i)


class StoreTiles:
    """Per-tile layers read from a :class:`diffst.inference.store.TileStore`, one tile at a time."""

    def __init__(self, store, num_samples: int, bound_keys):
        self.store = store
        self.num_samples = int(num_samples)
        self.bound_keys = sorted(bound_keys)

    def get(self, i: int) -> dict[str, np.ndarray]:
        """Layers of tile ``i`` as written by :func:`diffst.inference.predict.predict_to_store`."""
        layers = self.store.read(i)
        if layers is None:
            self.store.discard(i)
            raise InputError(f"The finished tile {i} in {self.store.path} could not be read (damaged on disk); it "
                             "was removed. Run the same command again: only that tile is predicted anew.")
        return layers

    def means(self, n: int) -> np.ndarray:
        """Return the point estimates of tiles 0..n-1 as one (n, N, H, W) array (for scoring a prepared split)."""
        first = self.get(0)["mean"]
        out = np.empty((n, *first.shape), np.float32)
        for i in range(n):
            out[i] = first if i == 0 else self.get(i)["mean"]
        return out


def layer_keys(dataset, source) -> list[str]:
    """List the maps stitched for a prediction: ``mean``, ``std`` (K > 1), the interval bounds, ``observed`` (HR)."""
    keys = ["mean"]
    if source.num_samples > 1:
        keys.append("std")
    keys += list(source.bound_keys)
    if dataset.has_hr:
        keys.append("observed")
    return keys


# -- band-wise stitching -------------------------------------------------------------------------------
@dataclass
class Band:
    """Rows ``top`` .. ``top + count.shape[0] - 1`` of a sample's HR grid: tile weights and weighted sums.

    ``count`` (rows, width) is the sum of the tiles' weights per bin, ``sums[key]`` (N, rows, width) the
    weighted sum of each map (of its square for ``std``).
    """

    top: int
    count: np.ndarray
    sums: dict[str, np.ndarray]

    def covered(self) -> tuple[np.ndarray, np.ndarray]:
        """Grid rows and columns of the bins some tile covers, row-major."""
        rows, cols = np.nonzero(self.count)
        return rows + self.top, cols

    def values(self, key: str) -> np.ndarray:
        """(n_covered, N) float64: the stitched map ``key`` at :meth:`covered` (root mean variance for ``std``)."""
        rows, cols = np.nonzero(self.count)
        avg = self.sums[key][:, rows, cols] / self.count[rows, cols]
        return np.sqrt(avg).T if key == "std" else avg.T

    def grid(self, key: str) -> np.ndarray:
        """(N, rows, width) float64: the stitched map ``key`` with NaN where no tile covers a bin."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.sums[key] / self.count
        return np.sqrt(out) if key == "std" else out


def tile_offsets(tiles: pd.DataFrame, hr_bin_um: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Grid row and column of each tile's corner, and the grid's origin in microns (as ``stitch`` places them)."""
    gx0, gy0 = float(tiles["x0_um"].min()), float(tiles["y0_um"].min())
    offs_c = np.round((tiles["x0_um"].to_numpy() - gx0) / hr_bin_um).astype(int)
    offs_r = np.round((tiles["y0_um"].to_numpy() - gy0) / hr_bin_um).astype(int)
    return offs_r, offs_c, gx0, gy0


def iter_bands(offs_r: np.ndarray, offs_c: np.ndarray, tile_hr: int, get_tile: Callable[[int], Mapping],
               keys: list[str], window: np.ndarray | None = None, band_rows: int | None = None) -> Iterator[Band]:
    """Stitch tiles band by band: running weighted sums over ``band_rows`` grid rows at a time.

    Parameters
    ----------
    offs_r, offs_c
        (T,) grid row / column of each tile's top-left bin.
    tile_hr
        Bins per tile side.
    get_tile
        ``get_tile(j)`` -> mapping key -> (N, H, W) of the j-th tile; called once per tile (tiles are kept
        only while bands they touch remain).
    keys
        The maps to stitch.
    window
        (H, W) weights per tile bin (None: all 1).
    band_rows
        Rows per band (default: one tile).

    Yields
    ------
    Band
        From the top of the grid down, each covering ``band_rows`` rows (the last one fewer).
    """
    h = w = int(tile_hr)
    band_rows = int(band_rows or h)
    grid_h, grid_w = int(offs_r.max()) + h, int(offs_c.max()) + w
    weight = np.ones((h, w)) if window is None else np.asarray(window, float)
    cache: dict[int, Mapping] = {}
    n_genes = None
    for top in range(0, grid_h, band_rows):
        bottom = min(top + band_rows, grid_h)
        count = np.zeros((bottom - top, grid_w))
        sums: dict[str, np.ndarray] = {}
        # Tiles in their original order, so that every bin's sum adds the same terms in the same order as stitch.
        for j in np.flatnonzero((offs_r < bottom) & (offs_r + h > top)):
            tile = cache.get(j)
            if tile is None:
                tile = cache[j] = get_tile(int(j))
            if n_genes is None:
                n_genes = tile[keys[0]].shape[0]
            r, c = int(offs_r[j]), int(offs_c[j])
            lo, hi = max(r, top), min(r + h, bottom)
            wpart = weight[lo - r : hi - r]
            count[lo - top : hi - top, c : c + w] += wpart
            for key in keys:
                if key not in sums:
                    sums[key] = np.zeros((n_genes, bottom - top, grid_w))
                value = np.asarray(tile[key])[:, lo - r : hi - r]
                sums[key][:, lo - top : hi - top, c : c + w] += wpart * (value**2 if key == "std" else value)
        for j in [j for j in cache if offs_r[j] + h <= bottom]:
            del cache[j]
        for key in keys:
            sums.setdefault(key, np.zeros((n_genes or 0, bottom - top, grid_w)))
        yield Band(top, count, sums)


# -- one chunk of output rows ----------------------------------------------------------------------------
@dataclass
class Chunk:
    """Consecutive output rows (HR bins) of one sample: obs columns, positions and stitched maps (float64)."""

    sample: str
    row: np.ndarray
    col: np.ndarray
    x_um: np.ndarray
    y_um: np.ndarray
    spatial: np.ndarray
    maps: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.row)

    def names(self) -> list[str]:
        """Row names ``<sample>_<row>_<col>``."""
        return [f"{self.sample}_{r}_{c}" for r, c in zip(self.row, self.col, strict=True)]


@dataclass
class SamplePlan:
    """What is stitched for one sample: its tiles (positions in the split, grid offsets) and placement."""

    name: str
    group: pd.DataFrame
    order: np.ndarray
    offs_r: np.ndarray
    offs_c: np.ndarray
    gx0: float
    gy0: float
    meta: dict


def plan_samples(dataset) -> list[SamplePlan]:
    """One :class:`SamplePlan` per sample of the split, in the order the tiles table lists them."""
    metas = {s["name"]: s for s in dataset.meta["samples"]}
    plans = []
    for name, group in dataset.tiles.groupby("sample", sort=False):
        offs_r, offs_c, gx0, gy0 = tile_offsets(group, dataset.geometry.hr_bin_um)
        plans.append(SamplePlan(str(name), group, group.index.to_numpy(), offs_r, offs_c, gx0, gy0, metas[name]))
    return plans


def iter_chunks(dataset, source, plan: SamplePlan, keys: list[str], window: np.ndarray | None,
                seams=None) -> Iterator[Chunk]:
    """Stitch one sample band by band and yield its output rows; ``seams`` (a SeamAccumulator) sees ``mean``."""
    geom = dataset.geometry
    hr = dataset.hr_counts if dataset.has_hr else None

    def get_tile(j: int) -> dict[str, np.ndarray]:
        i = int(plan.order[j])
        layers = dict(source.get(i))
        if hr is not None:
            layers["observed"] = np.asarray(hr[i])
        return layers

    um_to_px = np.asarray(plan.meta["um_to_px"])
    for band in iter_bands(plan.offs_r, plan.offs_c, geom.tile_hr, get_tile, keys, window):
        release_pages(hr)
        if seams is not None:
            seams.add(band.grid("mean"))
        rows, cols = band.covered()
        x_um = plan.gx0 + (cols + 0.5) * geom.hr_bin_um
        y_um = plan.gy0 + (rows + 0.5) * geom.hr_bin_um
        xy = np.column_stack([x_um, y_um])
        spatial = xy @ um_to_px[:2, :2].T + um_to_px[:2, 2]
        yield Chunk(plan.name, rows, cols, x_um, y_um, spatial, {k: band.values(k) for k in keys})


# -- histology ------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def slide_histology(tissue, x0_um: np.ndarray, y0_um: np.ndarray, tile_um: float, um_to_px: np.ndarray,
                    max_side: int | None = None):
    """Build the hires image of a sample for ``uns['spatial']``, without the full-resolution mosaic.

    Like :func:`diffst.inference.histology.mosaic_tiles` followed by
    :func:`~diffst.inference.histology.hires_image`, but each tile image is first averaged over d x d pixel
    blocks, d the largest divisor of the tile's side that keeps the mosaic at least as fine as the hires
    image (d = 1, the same result, whenever the mosaic is small enough): memory stays near that of the hires
    image (at most ``max_side`` pixels a side).

    Returns
    -------
    tuple
        ``(image, scalef, mosaic_um_per_px)``: (H, W, 3) uint8, ``tissue_hires_scalef`` and the microns per
        pixel of the mosaic it was resampled from.
    """
    from diffst.inference.histology import (
        HIRES_MAX_SIDE,
        HistologyMosaic,
        background_value,
        full_resolution_extent,
        hires_image,
    )

    max_side = HIRES_MAX_SIDE if max_side is None else max_side
    n_tiles, channels, side, _ = tissue.shape
    if n_tiles == 0:
        raise InputError("No tiles to build the histology mosaic from; the split holds no tiles.")
    um_to_px = np.asarray(um_to_px, float)
    native = tile_um / side
    # The hires image's pixel in microns when max_side caps it (as hires_image decides, from the mosaic extent).
    gx0, gy0 = float(np.min(x0_um)), float(np.min(y0_um))
    x1, y1 = float(np.max(x0_um)) + tile_um, float(np.max(y0_um)) + tile_um
    far_x, far_y, full_px_um = full_resolution_extent((gx0, gy0, x1, y1), um_to_px)
    hires_um = full_px_um * max(far_x, far_y) / max_side
    factor = max(d for d in _divisors(side) if d == 1 or native * d <= hires_um)
    small = side // factor
    um_per_px = tile_um / small
    cols = np.round((np.asarray(x0_um) - gx0) / um_per_px).astype(int)
    rows = np.round((np.asarray(y0_um) - gy0) / um_per_px).astype(int)
    height, width = rows.max() + small, cols.max() + small
    covered = np.zeros((height, width), bool)
    mosaic_image = np.full((height, width, channels), background_value(channels), np.uint8)
    # In strips of rows: only a strip's running sums exist. Each pixel adds its tiles in their order, as one
    # slide-sized sum would; a tile reaching into the next strip is kept (shrunk) for it, not read again.
    strip = max(small, 256)
    kept: dict[int, np.ndarray] = {}
    done = 0
    for top in range(0, height, strip):
        bottom = min(top + strip, height)
        total = np.zeros((bottom - top, width, channels), np.float32)
        count = np.zeros((bottom - top, width), np.uint16)
        for j in np.flatnonzero((rows < bottom) & (rows + small > top)):
            image = kept.pop(j, None)
            if image is None:
                image = np.moveaxis(np.asarray(tissue[j], np.float32), 0, -1)
                if factor > 1:
                    image = image.reshape(small, factor, small, factor, channels).mean(axis=(1, 3))
                done += 1
                if done % 256 == 0:
                    release_pages(getattr(tissue, "array", tissue))
            r, c = rows[j], cols[j]
            lo, hi = max(r, top), min(r + small, bottom)
            total[lo - top : hi - top, c : c + small] += image[lo - r : hi - r]
            count[lo - top : hi - top, c : c + small] += 1
            if r + small > bottom:
                kept[j] = image
        part = count > 0
        covered[top:bottom] = part
        mosaic_image[top:bottom][part] = np.clip(np.round(total[part] / count[part, None]), 0, 255).astype(np.uint8)
    release_pages(getattr(tissue, "array", tissue))
    del total, count
    mosaic = HistologyMosaic(mosaic_image, gx0, gy0, um_per_px, covered)
    # A coarser mosaic's last pixel centre lies further inside its edge: hold the edge value out to the edge.
    image, scalef = hires_image(mosaic, um_to_px, max_side, hold_edges=factor > 1)
    return image, scalef, um_per_px


def spatial_entry(dataset, plan: SamplePlan) -> dict[str, Any]:
    """``uns['spatial'][sample]``: hires image rebuilt from the tiles, scale factors, where the image came from."""
    geom = dataset.geometry
    um_to_px = np.asarray(plan.meta["um_to_px"])
    px_um = float(plan.meta["pixel_size_um"])
    hires, scalef, mosaic_um = slide_histology(_Rows(dataset.tissue, plan.order), plan.group["x0_um"].to_numpy(),
                                               plan.group["y0_um"].to_numpy(), geom.tile_um, um_to_px)
    return {
        "images": {"hires": hires},
        "scalefactors": {"spot_diameter_fullres": geom.hr_bin_um / px_um, "tissue_hires_scalef": scalef,
                         "bin_size_um": geom.hr_bin_um, "microns_per_pixel": px_um},
        # Only the predicted tiles' histology exists in a prepared dataset; the rest of the image is blank.
        "metadata": {"source_image": f"mosaic of the {dataset.split} tiles' tissue images ({mosaic_um:g} µm/px)"},
    }


class _Rows:
    """Tiles ``order`` of a (memory-mapped) array, read one at a time: ``len``, ``shape`` and ``[j]``."""

    def __init__(self, array, order: np.ndarray):
        self.array, self.order = array, np.asarray(order)
        self.shape = (len(self.order), *array.shape[1:])

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int) -> np.ndarray:
        return np.asarray(self.array[int(self.order[j])])


def _uns_diffst(dataset, source, blend: str, extra_uns: Mapping | None, seams: dict) -> dict:
    record = {"geometry": dataset.geometry.to_dict(), "split": dataset.split, "n_tiles": len(dataset),
              "num_samples": int(source.num_samples), "blend": blend, **(extra_uns or {})}
    if seams:
        record["seams"] = seams
    return record


def _check_blend(blend: str) -> None:
    if blend not in ("mean", "window"):
        raise InputError(f"blend='{blend}': use 'mean' or 'window'.")


# -- in memory ------------------------------------------------------------------------------------------
def build_anndata(dataset, source, *, extra_uns: Mapping | None = None, blend: str = "mean"):
    """Build the AnnData of :func:`diffst.inference.predict.to_anndata` from any per-tile source."""
    import anndata as ad

    from diffst.inference.whole_slide import tile_window

    _check_blend(blend)
    geom = dataset.geometry
    window = tile_window(geom.tile_hr) if blend == "window" else None
    keys = layer_keys(dataset, source)
    chunks, spatial, seams = [], {}, {}
    for plan in plan_samples(dataset):
        acc = _seam_accumulator(plan, geom) if window is not None else None
        chunks += list(iter_chunks(dataset, source, plan, keys, window, acc))
        if acc is not None:
            seams[plan.name] = acc.result()
        spatial[plan.name] = spatial_entry(dataset, plan)
    obs = pd.DataFrame({"sample": np.concatenate([np.full(len(c), c.sample, dtype=object) for c in chunks]),
                        "row": np.concatenate([c.row for c in chunks]), "col": np.concatenate([c.col for c in chunks]),
                        "x_um": np.concatenate([c.x_um for c in chunks]),
                        "y_um": np.concatenate([c.y_um for c in chunks])})
    obs.index = [name for c in chunks for name in c.names()]
    obs["sample"] = obs["sample"].astype("category")

    def gather(key: str) -> np.ndarray:
        return np.concatenate([c.maps[key] for c in chunks]).astype(np.float32)

    adata = ad.AnnData(X=gather("mean"), obs=obs, var=pd.DataFrame(index=list(dataset.genes)))
    for key in ("std", "observed", *source.bound_keys):
        if key in keys:
            adata.layers[key] = gather(key)
    adata.obsm["spatial"] = np.concatenate([c.spatial for c in chunks])
    adata.obsm["spatial_um"] = obs[["x_um", "y_um"]].to_numpy()
    adata.uns["spatial"] = spatial
    adata.uns["diffst"] = _uns_diffst(dataset, source, blend, extra_uns, seams)
    return adata


def _seam_accumulator(plan: SamplePlan, geom):
    from diffst.inference.whole_slide import SeamAccumulator

    tile = geom.tile_hr
    return SeamAccumulator(plan.offs_r, plan.offs_c, int(plan.offs_r.max()) + tile, int(plan.offs_c.max()) + tile,
                           tile)


# -- streamed to a file ---------------------------------------------------------------------------------
_ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}
_STRINGS = {"encoding-type": "string-array", "encoding-version": "0.2.0"}
_DICT = {"encoding-type": "dict", "encoding-version": "0.1.0"}


class _HDF5Columns:
    """Growing HDF5 datasets (first axis) that take consecutive row blocks, in AnnData's on-disk encoding."""

    def __init__(self):
        import h5py

        self.strings = h5py.string_dtype()

    def create(self, group, name: str, dtype, width: int | None = None, attrs: Mapping = _ARRAY):
        shape = (0,) if width is None else (0, width)
        maxshape = (None,) if width is None else (None, width)
        chunks = (8192,) if width is None else (max(1, min(8192, 2**20 // max(1, width * 8))), width)
        ds = group.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=chunks)
        ds.attrs.update(attrs)
        return ds

    def fixed(self, group, name: str, values: list[str], attrs: Mapping = _STRINGS):
        group.create_dataset(name, data=np.array(values, dtype=object), dtype=self.strings).attrs.update(attrs)

    @staticmethod
    def group(parent, name: str, attrs: Mapping):
        child = parent.create_group(name)
        child.attrs.update(attrs)
        return child

    @staticmethod
    def append(ds, values) -> None:
        values = _rows(values)
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n : n + len(values)] = values


class _ZarrColumns:
    """The same for a zarr group (a SpatialData table): growing zarr arrays, JSON attributes."""

    def __init__(self):
        self.strings = str  # zarr's variable-length UTF-8 strings, as anndata writes them

    def create(self, group, name: str, dtype, width: int | None = None, attrs: Mapping = _ARRAY):
        shape = (0,) if width is None else (0, width)
        chunks = (65536,) if width is None else (max(1, min(65536, 2**22 // max(1, width * 8))), width)
        ds = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks)
        ds.attrs.update(_json_attrs(attrs))
        return ds

    def fixed(self, group, name: str, values: list[str], attrs: Mapping = _STRINGS):
        ds = group.create_array(name, shape=(len(values),), dtype=str)
        ds[:] = np.array(values, dtype=object)
        ds.attrs.update(_json_attrs(attrs))

    @staticmethod
    def group(parent, name: str, attrs: Mapping):
        child = parent.create_group(name)
        child.attrs.update(_json_attrs(attrs))
        return child

    @staticmethod
    def append(ds, values) -> None:
        ds.append(_rows(values))


def _rows(values) -> np.ndarray:
    """Return a block of rows to append: a list (of row names) as an object array of strings, else as it is."""
    return np.array(values, dtype=object) if isinstance(values, list) else np.asarray(values)


def _json_attrs(attrs: Mapping) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}


def _codes(n_categories: int):
    return np.int8 if n_categories < 128 else np.int16 if n_categories < 2**15 else np.int32


def stream_table(root, columns, dataset, source, *, extra_uns: Mapping | None = None, blend: str = "mean",
                 regions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the prediction's AnnData into ``root`` (an HDF5 file or zarr group) band by band.

    What :func:`build_anndata` makes, in AnnData's on-disk encoding, without holding more than a band. With
    ``regions`` (sample -> SpatialData element name) the rows also get ``obs['region']`` (that name) and
    ``obs['instance_id']`` (1, 2, ... per sample in row order: the label of the bin in a labels raster).

    Returns
    -------
    dict
        ``n_obs``, ``n_vars``, ``seams`` (per sample, blend ``window`` only) and ``n_per_sample``.
    """
    from anndata.io import write_elem

    from diffst.inference.whole_slide import tile_window

    _check_blend(blend)
    geom = dataset.geometry
    window = tile_window(geom.tile_hr) if blend == "window" else None
    keys = layer_keys(dataset, source)
    n_genes = len(dataset.genes)
    plans = plan_samples(dataset)
    categories = sorted(p.name for p in plans)
    code_of = {name: i for i, name in enumerate(categories)}
    code_dtype = _codes(len(categories))
    obs_columns = [*OBS_COLUMNS, *(("region", "instance_id") if regions else ())]
    spatial, seams, n_obs, n_per_sample = {}, {}, 0, {}
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    x = columns.create(root, "X", np.float32, n_genes)
    layers_group = columns.group(root, "layers", _DICT)
    layer_names = [k for k in ("std", "observed", *source.bound_keys) if k in keys]
    layers = {k: columns.create(layers_group, k, np.float32, n_genes) for k in layer_names}
    obs = columns.group(root, "obs", {"_index": "_index", "column-order": np.array(obs_columns, dtype=object),
                                      "encoding-type": "dataframe", "encoding-version": "0.2.0"})
    index = columns.create(obs, "_index", columns.strings, attrs=_STRINGS)
    categorical = {"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False}
    sample = columns.group(obs, "sample", categorical)
    columns.fixed(sample, "categories", categories)
    codes = columns.create(sample, "codes", code_dtype)
    numeric = {"row": columns.create(obs, "row", np.int64), "col": columns.create(obs, "col", np.int64),
               "x_um": columns.create(obs, "x_um", np.float64), "y_um": columns.create(obs, "y_um", np.float64)}
    if regions:
        region_names = sorted(regions[name] for name in categories)
        region_code = {name: region_names.index(regions[name]) for name in categories}
        region = columns.group(obs, "region", categorical)
        columns.fixed(region, "categories", region_names)
        region_codes = columns.create(region, "codes", _codes(len(region_names)))
        instance = columns.create(obs, "instance_id", np.int64)
    obsm = columns.group(root, "obsm", _DICT)
    positions = {"spatial": columns.create(obsm, "spatial", np.float64, 2),
                 "spatial_um": columns.create(obsm, "spatial_um", np.float64, 2)}
    for plan in plans:
        acc = _seam_accumulator(plan, geom) if window is not None else None
        done = 0
        for chunk in iter_chunks(dataset, source, plan, keys, window, acc):
            if not len(chunk):
                continue
            columns.append(x, chunk.maps["mean"].astype(np.float32))
            for key, ds in layers.items():
                columns.append(ds, chunk.maps[key].astype(np.float32))
            columns.append(index, chunk.names())
            columns.append(codes, np.full(len(chunk), code_of[plan.name], code_dtype))
            for key, ds in numeric.items():
                columns.append(ds, getattr(chunk, key))
            columns.append(positions["spatial"], chunk.spatial)
            columns.append(positions["spatial_um"], np.column_stack([chunk.x_um, chunk.y_um]))
            if regions:
                columns.append(region_codes, np.full(len(chunk), region_code[plan.name], region_codes.dtype))
                columns.append(instance, np.arange(done + 1, done + len(chunk) + 1, dtype=np.int64))
            done += len(chunk)
            release_memory()  # the band's temporaries would otherwise stay on glibc's heap, fragmented
        n_obs += done
        n_per_sample[plan.name] = done
        if acc is not None:
            seams[plan.name] = acc.result()
        spatial[plan.name] = spatial_entry(dataset, plan)
        release_pages(*dataset_maps(dataset))
        release_memory()
    write_elem(root, "var", pd.DataFrame(index=list(dataset.genes)))
    for name in ("varm", "obsp", "varp"):
        write_elem(root, name, {})
    uns = {"spatial": spatial, "diffst": _uns_diffst(dataset, source, blend, extra_uns, seams)}
    if regions:
        uns["spatialdata_attrs"] = {"region": sorted(set(regions.values())), "region_key": "region",
                                    "instance_key": "instance_id"}
    write_elem(root, "uns", uns)
    return {"n_obs": n_obs, "n_vars": n_genes, "seams": seams, "n_per_sample": n_per_sample}


def write_h5ad_stream(dataset, source, path: str | Path, *, extra_uns: Mapping | None = None,
                      blend: str = "mean") -> dict[str, Any]:
    """Write the prediction as an ``.h5ad`` band by band (:func:`stream_table`): memory does not grow with the slide.

    The file reads back (``anndata.read_h5ad``) as the AnnData :func:`build_anndata` makes for the same
    tiles. It is written under a temporary name and moved into place when complete
    (:func:`diffst.atomic.atomic_output`): a failure leaves nothing at ``path``.

    Returns
    -------
    dict
        ``n_obs``, ``n_vars`` and ``seams`` (per sample, blend ``window`` only).
    """
    import h5py

    from diffst.atomic import atomic_output

    _check_blend(blend)
    # No chunk cache: rows are appended once, in order, and every dataset would keep its own cache.
    with atomic_output(Path(path), directory=False) as tmp, h5py.File(tmp, "w", rdcc_nbytes=0) as fh:
        written = stream_table(fh, _HDF5Columns(), dataset, source, extra_uns=extra_uns, blend=blend)
    return {k: written[k] for k in ("n_obs", "n_vars", "seams")}
