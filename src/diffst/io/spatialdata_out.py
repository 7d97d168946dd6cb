"""Write a prediction as a SpatialData zarr store (histology, HR bins, input LR spots, tables), streamed.

Needs the optional packages of the ``spatial`` extra (``pip install 'diffst[spatial]'``); nothing here is
imported by ``import diffst.io``.

Layout of the store, per sample ``S`` of the predicted split (element names keep only letters, digits,
``_``, ``-`` and ``.`` of the sample name):

* ``images/S_histology``: the histology of the predicted tiles, (c, y, x) uint8 (channels ``r, g, b`` for
  H&E, ``channel_0..`` for fluorescence), a mosaic of the prepared tile images averaged where tiles overlap
  (as :func:`diffst.inference.histology.mosaic_tiles` makes it), multiscale when its longest side exceeds
  4096 px; transformation to microns: a scale by the mosaic's µm per pixel, then a translation to its corner;
* ``labels/S_hr_bins``: the HR bins as a labels raster, one pixel per bin (0 where nothing was predicted,
  else the bin's ``instance_id``); transformation to microns: a scale by the bin size, then a translation to
  the grid's corner. A raster rather than one polygon per bin: a slide has millions of bins, and
  spatialdata-plot colours labels by a table column as it colours shapes
  (``sdata.pl.render_labels("S_hr_bins", color=gene, table_name="table")``);
* ``shapes/S_lr_spots``: one square per measured LR bin the model was given (a pseudo-spot, or the bin
  holding a real spot's centre), in microns; where tiles overlap with LR grids that do not coincide,
  the first tile's bins are kept and overlapping ones dropped, so shapes never overlap;
* ``tables/table``: the prediction as :func:`diffst.inference.predict.to_anndata` makes it
  (``X`` point estimate in counts, ``layers['std']``, the interval bounds, ``layers['observed']``,
  ``uns['spatial']`` for squidpy, ``uns['diffst']`` with the provenance), annotating the ``S_hr_bins``
  labels through ``obs['region']`` / ``obs['instance_id']``;
* ``tables/lr_spots``: the measured LR counts per spot (``X``), annotating ``S_lr_spots``.

Coordinate system: ``global`` when the split holds one sample, else one per sample, named as its elements.

Memory does not grow with the slide: the table is written band by band
(:func:`diffst.inference.output.stream_table`), the histology is a lazy dask array computed block by block
as it is written, and the labels raster holds 4 bytes per HR bin.
"""

from __future__ import annotations

import importlib
import re
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from diffst.errors import InputError

if TYPE_CHECKING:
    from diffst.data.dataset import PreparedTiles

SPATIAL_EXTRA = "pip install 'diffst[spatial]'"
HR_TABLE = "table"
LR_TABLE = "lr_spots"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
# Beyond this side a single-scale image is slow to pan in napari / to render; add a pyramid.
PYRAMID_ABOVE_PX = 4096
#: Side of the blocks the histology mosaic is computed and stored in (the writer holds a few at a time).
MOSAIC_BLOCK_PX = 1024
#: The table format version spatialdata 0.7 writes on a table's group (``ngff:regions_table``).
TABLE_FORMAT_VERSION = "0.2"


def require_spatial(module: str = "spatialdata", *, action: str = "Writing",
                    instead: str = "write AnnData with --out NAME.h5ad") -> Any:
    """Import an optional package of the ``spatial`` extra, or say how to install it.

    ``action`` (``"Writing"`` / ``"Reading"``) and ``instead`` (what works without the extra) go into the
    message.

    Raises
    ------
    InputError
        When the package is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(
            f"{action} a SpatialData store (.zarr) needs the optional package '{module.split('.')[0]}', which is not "
            f"installed ({exc}). Install the extra with: {SPATIAL_EXTRA}; or {instead}."
        ) from None


def element_prefix(sample: str) -> str:
    """Turn a sample name into what SpatialData allows in element names (letters, digits, ``_``, ``-``, ``.``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", str(sample)).lstrip("_.") or "sample"
    return cleaned


def coordinate_system_names(samples: list[str]) -> dict[str, str]:
    """Coordinate system of each sample: ``global`` for a single sample, else the sample's element prefix."""
    if len(samples) == 1:
        return {samples[0]: "global"}
    return {s: element_prefix(s) for s in samples}


def lr_spot_tables(dataset: PreparedTiles) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """Collect the measured LR bins of the split's tiles, per sample, without overlaps.

    Returns
    -------
    dict
        sample -> ``(spots, counts)``: ``spots`` has ``x0_um``, ``y0_um`` (top-left corner), ``x_um``, ``y_um``
        (centre) per LR bin; ``counts`` (n, N) float32 its measured counts. A bin is dropped when it overlaps
        a bin already taken from an earlier tile (tiles may overlap with LR grids that do not coincide).
    """
    geom = dataset.geometry
    s, lr_um = geom.scale, geom.lr_bin_um
    out = {}
    for name, group in dataset.tiles.groupby("sample", sort=False):
        gx0, gy0 = group["x0_um"].min(), group["y0_um"].min()
        # Tile corners lie on the HR grid, so an occupancy grid of HR bins decides overlaps exactly.
        offs_c = np.round((group["x0_um"].to_numpy() - gx0) / geom.hr_bin_um).astype(int)
        offs_r = np.round((group["y0_um"].to_numpy() - gy0) / geom.hr_bin_um).astype(int)
        occupied = np.zeros((offs_r.max() + geom.tile_hr, offs_c.max() + geom.tile_hr), bool)
        corners, counts = [], []
        for tile, r0, c0 in zip(group.index.to_numpy(), offs_r, offs_c, strict=True):
            mask = np.asarray(dataset.lr_mask[tile], bool)
            lr = np.asarray(dataset.lr_counts[tile], np.float32)
            for a, b in zip(*np.nonzero(mask), strict=True):
                r, c = r0 + a * s, c0 + b * s
                if occupied[r : r + s, c : c + s].any():
                    continue
                occupied[r : r + s, c : c + s] = True
                corners.append((gx0 + c * geom.hr_bin_um, gy0 + r * geom.hr_bin_um))
                counts.append(lr[:, a, b])
        xy = np.asarray(corners, float).reshape(-1, 2)
        spots = pd.DataFrame({"x0_um": xy[:, 0], "y0_um": xy[:, 1], "x_um": xy[:, 0] + lr_um / 2,
                              "y_um": xy[:, 1] + lr_um / 2})
        out[str(name)] = (spots, np.asarray(counts, np.float32).reshape(len(spots), len(dataset.genes)))
    return out


def _squares(x0: np.ndarray, y0: np.ndarray, side: float, cs: str):
    """Square polygons of side ``side`` µm with top-left corners (x0, y0), as a parsed SpatialData shapes element."""
    geopandas = require_spatial("geopandas")
    shapely = require_spatial("shapely")
    models = require_spatial("spatialdata.models")
    transformations = require_spatial("spatialdata.transformations")
    x0, y0 = np.asarray(x0, float), np.asarray(y0, float)
    geometry = shapely.box(x0, y0, x0 + side, y0 + side)
    frame = geopandas.GeoDataFrame(geometry=geometry, index=pd.RangeIndex(len(x0), name=INSTANCE_KEY))
    return models.ShapesModel.parse(frame, transformations={cs: transformations.Identity()})


def bin_labels(plan, tile_hr: int) -> np.ndarray:
    """Labels raster of one sample's HR grid: bin ``instance_id`` (1, 2, ... in row-major order), 0 where no tile is.

    The bins some tile covers are the rows :func:`diffst.inference.output.iter_chunks` yields, in the same
    order, so label ``i`` is the sample's ``i``-th table row.
    """
    height, width = int(plan.offs_r.max()) + tile_hr, int(plan.offs_c.max()) + tile_hr
    covered = np.zeros((height, width), bool)
    for r, c in zip(plan.offs_r, plan.offs_c, strict=True):
        covered[r : r + tile_hr, c : c + tile_hr] = True
    n = int(covered.sum())
    labels = np.zeros((height, width), np.int32 if n < 2**31 else np.int64)
    labels[covered] = np.arange(1, n + 1)
    return labels


def lazy_mosaic(tissue, order: np.ndarray, x0_um: np.ndarray, y0_um: np.ndarray, tile_um: float,
                block: int = MOSAIC_BLOCK_PX):
    """Make the tiles' histology mosaic a lazy (c, y, x) uint8 dask array, computed block by block when written.

    Pixel for pixel what :func:`diffst.inference.histology.mosaic_tiles` makes (tile images averaged where
    they overlap, background elsewhere), without holding the slide: a block reads only the tiles that
    touch it (``tissue[order[j]]``, a memory map read one tile at a time).

    Returns
    -------
    tuple
        ``(image, x0_um, y0_um, um_per_px)``: the array and where its pixel (0, 0) lies.
    """
    import dask.array as da

    from diffst.inference.histology import paste_window, place_tiles
    from diffst.memory import release_memory, release_pages

    order = np.asarray(order)
    place = place_tiles(len(order), int(tissue.shape[2]), x0_um, y0_um, tile_um)
    channels = int(tissue.shape[1])

    def compute(block_info=None) -> np.ndarray:
        (_, _), (top, bottom), (left, right) = block_info[None]["array-location"]
        image, _ = paste_window(tissue, order, place, top, bottom, left, right)
        release_pages(tissue)
        release_memory()  # freed blocks would otherwise stay on glibc's heap, fragmented
        return image

    chunks = ((channels,), _runs(place.height, block), _runs(place.width, block))
    # A name of our own: otherwise dask hashes the function, closure and all, and reads the whole memory map.
    image = da.map_blocks(compute, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8),
                          name=f"diffst-histology-{uuid.uuid4().hex}")
    return image, place.x0_um, place.y0_um, place.um_per_px


def _runs(total: int, size: int) -> tuple[int, ...]:
    return tuple(min(size, total - start) for start in range(0, total, size))


def write_prediction_spatialdata(dataset: PreparedTiles, source, path: str | Path, *,
                                 extra_uns: dict | None = None, blend: str = "mean") -> dict[str, Any]:
    """Write a prediction as a SpatialData zarr store (layout in this module's docstring), streamed.

    Parameters
    ----------
    dataset
        The predicted split.
    source
        Its per-tile predictions: :class:`diffst.inference.predict.TilePredictions` (in memory) or a per-tile
        source of :mod:`diffst.inference.output` (``MemoryTiles``, ``StoreTiles``).
    path
        The ``.zarr`` store to write. It is written under a hidden temporary name beside ``path`` and moved
        into place when complete (:func:`diffst.atomic.atomic_output`): a failure leaves nothing at ``path``,
        and an existing store there is replaced in one exchange. Check first with
        :func:`diffst.atomic.check_replaceable` (and :func:`is_diffst_spatialdata`) that ``path`` may be
        replaced: this function does not ask.
    extra_uns
        Added to the table's ``uns['diffst']`` (checkpoint, sampler, provenance).
    blend
        How overlapping tiles combine: ``"mean"`` or ``"window"`` (:func:`diffst.inference.output.stream_table`).

    Returns
    -------
    dict
        ``n_obs``, ``n_vars`` and ``seams`` (per sample, blend ``window`` only).
    """
    sd = require_spatial("spatialdata")
    zarr = require_spatial("zarr")
    import anndata as ad

    from diffst.atomic import atomic_output
    from diffst.inference.output import MemoryTiles, _ZarrColumns, plan_samples, stream_table

    models = require_spatial("spatialdata.models")
    tf = require_spatial("spatialdata.transformations")
    if not hasattr(source, "get"):
        source = MemoryTiles(source)
    geom = dataset.geometry
    plans = plan_samples(dataset)
    systems = coordinate_system_names([p.name for p in plans])
    images, labels, shapes, regions = {}, {}, {}, {}
    for plan in plans:
        prefix, cs = element_prefix(plan.name), systems[plan.name]
        mosaic, mx0, my0, um_per_px = lazy_mosaic(dataset.tissue, plan.order, plan.group["x0_um"].to_numpy(),
                                                  plan.group["y0_um"].to_numpy(), geom.tile_um)
        channels = ["r", "g", "b"] if mosaic.shape[0] == 3 else [f"channel_{i}" for i in range(mosaic.shape[0])]
        pyramid = []
        while max(mosaic.shape[1:]) / 2 ** len(pyramid) > PYRAMID_ABOVE_PX:
            pyramid.append(2)
        to_um = tf.Sequence([tf.Scale([um_per_px, um_per_px], axes=("y", "x")),
                             tf.Translation([my0, mx0], axes=("y", "x"))])
        images[f"{prefix}_histology"] = models.Image2DModel.parse(
            mosaic, dims=("c", "y", "x"), c_coords=channels, transformations={cs: to_um},
            scale_factors=pyramid or None, chunks=(len(channels), MOSAIC_BLOCK_PX, MOSAIC_BLOCK_PX))
        bins_to_um = tf.Sequence([tf.Scale([geom.hr_bin_um, geom.hr_bin_um], axes=("y", "x")),
                                  tf.Translation([plan.gy0, plan.gx0], axes=("y", "x"))])
        labels[f"{prefix}_hr_bins"] = models.Labels2DModel.parse(
            bin_labels(plan, geom.tile_hr), dims=("y", "x"), transformations={cs: bins_to_um})
        regions[plan.name] = f"{prefix}_hr_bins"

    tables = {}
    lr_parts, lr_region, lr_instance = [], [], []
    for name, (spots, counts) in lr_spot_tables(dataset).items():
        if not len(spots):
            continue
        prefix = element_prefix(name)
        shapes[f"{prefix}_lr_spots"] = _squares(spots["x0_um"], spots["y0_um"], geom.lr_bin_um, systems[name])
        obs = spots[["x_um", "y_um"]].assign(sample=name)
        obs.index = [f"{name}_lr_{i}" for i in range(len(spots))]
        lr_parts.append(ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=list(dataset.genes))))
        lr_region += [f"{prefix}_lr_spots"] * len(spots)
        lr_instance.append(np.arange(len(spots)))
    if lr_parts:
        lr = ad.concat(lr_parts, merge="same")
        lr.obs["sample"] = lr.obs["sample"].astype("category")
        lr.uns["diffst"] = {"what": "measured LR counts per LR bin given to the model", "lr_bin_um": geom.lr_bin_um}
        lr.obs[REGION_KEY] = pd.Categorical(lr_region)
        lr.obs[INSTANCE_KEY] = np.concatenate(lr_instance).astype(np.int64)
        tables[LR_TABLE] = models.TableModel.parse(lr, region=sorted(set(lr_region)), region_key=REGION_KEY,
                                                   instance_key=INSTANCE_KEY)

    path = Path(path)
    with atomic_output(path, directory=True) as tmp, warnings.catch_warnings():
        # zarr announces a future default once per array; it says nothing about this store.
        warnings.filterwarnings("ignore", message=".*zarr v3 autosharding", category=UserWarning)
        # Consolidating notes that spatialdata's parquet files are not zarr nodes and that consolidated
        # metadata is a zarr-python convention; spatialdata reads it so.
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        tmp.rmdir()  # spatialdata creates the store folder itself
        sd.SpatialData(images=images, labels=labels, shapes=shapes, tables=tables).write(
            tmp, overwrite=False, update_sdata_path=False)
        table = zarr.open_group(tmp, mode="a").require_group("tables").create_group(HR_TABLE)
        written = stream_table(table, _ZarrColumns(), dataset, source, extra_uns=extra_uns, blend=blend,
                               regions=regions)
        # What spatialdata writes on a table's group, so that it reads back as an annotating table.
        table.attrs.update({"spatialdata-encoding-type": "ngff:regions_table",
                            "region": sorted(set(regions.values())), "region_key": REGION_KEY,
                            "instance_key": INSTANCE_KEY, "version": TABLE_FORMAT_VERSION})
        for plan in plans:  # checked before the store is moved into place, so a failure leaves nothing there
            expected = int(np.count_nonzero(labels[regions[plan.name]]))
            if written["n_per_sample"].get(plan.name, 0) != expected:  # pragma: no cover - an internal invariant
                raise RuntimeError(f"{plan.name}: {written['n_per_sample'].get(plan.name)} table rows for "
                                   f"{expected} labelled bins")
        zarr.consolidate_metadata(tmp)
    return {k: written[k] for k in ("n_obs", "n_vars", "seams")}


def is_diffst_spatialdata(path: str | Path) -> bool:
    """Tell whether ``path`` is a SpatialData store that Diff-ST wrote (its table carries ``uns/diffst``)."""
    path = Path(path)
    return path.is_dir() and (path / "tables" / HR_TABLE / "uns" / "diffst").is_dir()
