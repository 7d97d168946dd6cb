"""Write a prediction as a SpatialData zarr store (histology, HR bins, input LR spots, tables).

Needs the optional packages of the ``spatial`` extra (``pip install 'diffst[spatial]'``); nothing here is
imported by ``import diffst.io``.

Layout of the store, per sample ``S`` of the predicted split (element names keep only letters, digits,
``_``, ``-`` and ``.`` of the sample name):

* ``images/S_histology``: the histology of the predicted tiles, (c, y, x) uint8 (channels ``r, g, b`` for
  H&E, ``channel_0..`` for fluorescence), a mosaic of the prepared tile images
  (:func:`diffst.inference.histology.mosaic_tiles`), multiscale when its longest side exceeds 4096 px;
  transformation to microns: a scale by the mosaic's µm per pixel, then a translation to its corner;
* ``shapes/S_hr_bins``: one square polygon per predicted HR bin, in microns, indexed by ``instance_id``;
* ``shapes/S_lr_spots``: one square per measured LR bin the model was given (a pseudo-spot, or the bin
  holding a real spot's centre), in microns; where tiles overlap with LR grids that do not coincide,
  the first tile's bins are kept and overlapping ones dropped, so shapes never overlap;
* ``tables/table``: the prediction as :func:`diffst.inference.predict.to_anndata` makes it
  (``X`` point estimate in counts, ``layers['std']``, ``layers['observed']``, ``uns['diffst']`` with the
  provenance), annotating the ``S_hr_bins`` shapes through ``obs['region']`` / ``obs['instance_id']``;
* ``tables/lr_spots``: the measured LR counts per spot (``X``), annotating ``S_lr_spots``.

Coordinate system: ``global`` when the split holds one sample, else one per sample, named as its elements.
"""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from diffst.errors import InputError

if TYPE_CHECKING:
    from diffst.data.dataset import PreparedTiles
    from diffst.inference.predict import TilePredictions

SPATIAL_EXTRA = "pip install 'diffst[spatial]'"
HR_TABLE = "table"
LR_TABLE = "lr_spots"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
# Beyond this side a single-scale image is slow to pan in napari / to render; add a pyramid.
PYRAMID_ABOVE_PX = 4096


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


def _annotating(adata, element_of_row: list[str], instance_ids: np.ndarray):
    """Mark each row of ``adata`` as the shape ``instance_ids[i]`` of element ``element_of_row[i]``."""
    models = require_spatial("spatialdata.models")
    adata.obs[REGION_KEY] = pd.Categorical(element_of_row)
    adata.obs[INSTANCE_KEY] = np.asarray(instance_ids, np.int64)
    return models.TableModel.parse(adata, region=sorted(set(element_of_row)), region_key=REGION_KEY,
                                   instance_key=INSTANCE_KEY)


def to_spatialdata(dataset: PreparedTiles, preds: TilePredictions, *, extra_uns: dict | None = None,
                   adata=None):
    """Build the SpatialData object of a prediction (layout in this module's docstring).

    Parameters
    ----------
    dataset, preds
        The predicted split and its predictions (:func:`diffst.inference.predict.predict_checkpoint`).
    extra_uns
        Added to the table's ``uns['diffst']`` (e.g. checkpoint, sampler, provenance), also when ``adata`` is
        given.
    adata
        The AnnData of the same prediction when already made (:func:`~diffst.inference.predict.to_anndata`);
        it is copied, not changed.

    Returns
    -------
    spatialdata.SpatialData
        Images ``S_histology``, shapes ``S_hr_bins`` and ``S_lr_spots``, tables ``table`` and ``lr_spots``.
    """
    sd = require_spatial("spatialdata")
    import anndata as ad

    from diffst.inference.histology import mosaic_tiles
    from diffst.inference.predict import to_anndata

    models = require_spatial("spatialdata.models")
    tf = require_spatial("spatialdata.transformations")
    geom = dataset.geometry
    if adata is None:
        table = to_anndata(dataset, preds, extra_uns=extra_uns)
    else:
        table = adata.copy()
        table.uns["diffst"] = {**table.uns.get("diffst", {}), **(extra_uns or {})}
    samples = [str(s) for s in table.obs["sample"].cat.categories if (table.obs["sample"] == s).any()]
    systems = coordinate_system_names(samples)
    images, shapes, region_of_row = {}, {}, np.empty(table.n_obs, dtype=object)
    instance_of_row = np.zeros(table.n_obs, np.int64)
    for name in samples:
        prefix, cs = element_prefix(name), systems[name]
        group = dataset.tiles[dataset.tiles["sample"] == name]
        mosaic = mosaic_tiles(dataset.tissue[group.index.to_numpy()], group["x0_um"].to_numpy(),
                              group["y0_um"].to_numpy(), geom.tile_um)
        channels = ["r", "g", "b"] if mosaic.is_rgb else [f"channel_{i}" for i in range(mosaic.image.shape[2])]
        pyramid = []
        while max(mosaic.image.shape[:2]) / 2 ** len(pyramid) > PYRAMID_ABOVE_PX:
            pyramid.append(2)
        to_um = tf.Sequence([tf.Scale([mosaic.um_per_px, mosaic.um_per_px], axes=("y", "x")),
                             tf.Translation([mosaic.y0_um, mosaic.x0_um], axes=("y", "x"))])
        images[f"{prefix}_histology"] = models.Image2DModel.parse(
            np.moveaxis(mosaic.image, -1, 0), dims=("c", "y", "x"), c_coords=channels,
            transformations={cs: to_um}, scale_factors=pyramid or None)
        rows = np.flatnonzero((table.obs["sample"] == name).to_numpy())
        half = geom.hr_bin_um / 2
        x0 = table.obs["x_um"].to_numpy()[rows] - half
        y0 = table.obs["y_um"].to_numpy()[rows] - half
        shapes[f"{prefix}_hr_bins"] = _squares(x0, y0, geom.hr_bin_um, cs)
        region_of_row[rows] = f"{prefix}_hr_bins"
        instance_of_row[rows] = np.arange(len(rows))
    table = _annotating(table, list(region_of_row), instance_of_row)

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
    tables = {HR_TABLE: table}
    if lr_parts:
        lr = ad.concat(lr_parts, merge="same")
        lr.obs["sample"] = lr.obs["sample"].astype("category")
        lr.uns["diffst"] = {"what": "measured LR counts per LR bin given to the model", "lr_bin_um": geom.lr_bin_um}
        tables[LR_TABLE] = _annotating(lr, lr_region, np.concatenate(lr_instance))
    return sd.SpatialData(images=images, shapes=shapes, tables=tables)


def is_diffst_spatialdata(path: str | Path) -> bool:
    """Tell whether ``path`` is a SpatialData store that Diff-ST wrote (its table carries ``uns/diffst``)."""
    path = Path(path)
    return path.is_dir() and (path / "tables" / HR_TABLE / "uns" / "diffst").is_dir()


def write_spatialdata(sdata, path: str | Path) -> Path:
    """Write a SpatialData object to a zarr store atomically: a failure leaves nothing at ``path``.

    The store is written under a hidden temporary name beside ``path`` and moved into place when complete
    (:func:`diffst.atomic.atomic_output`); an existing store at ``path`` is replaced in one exchange. Check
    first with :func:`diffst.atomic.check_replaceable` (and :func:`is_diffst_spatialdata`) that ``path`` may
    be replaced: this function does not ask.

    Returns
    -------
    Path
        ``path``.
    """
    from diffst.atomic import atomic_output

    path = Path(path)
    with atomic_output(path, directory=True) as tmp, warnings.catch_warnings():
        # zarr announces a future default once per array; it says nothing about this store.
        warnings.filterwarnings("ignore", message=".*zarr v3 autosharding", category=UserWarning)
        tmp.rmdir()  # spatialdata creates the store folder itself
        sdata.write(tmp, overwrite=False, update_sdata_path=False)
    return path


def write_prediction_spatialdata(dataset: PreparedTiles, preds: TilePredictions, path: str | Path, *,
                                 extra_uns: dict | None = None, adata=None) -> Path:
    """Build (:func:`to_spatialdata`) and write (:func:`write_spatialdata`) a prediction as a zarr store.

    Writes the elements listed in this module's docstring at ``path``; returns ``path``.
    """
    return write_spatialdata(to_spatialdata(dataset, preds, extra_uns=extra_uns, adata=adata), path)
