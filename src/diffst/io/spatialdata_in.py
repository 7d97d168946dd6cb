"""Read a SpatialData zarr store (as spatialdata-io writes Xenium, Visium and Visium HD) into a Sample.

Needs the optional packages of the ``spatial`` extra (``pip install 'diffst[spatial]'``).

What is read
------------
* **Point data** (Xenium and other imaging platforms): a points element with x, y and a gene column
  (``feature_key`` of its attributes, else ``feature_name`` / ``gene`` / ``target``). Only x, y, the gene,
  ``qv`` and ``overlaps_nucleus`` are read, one parquet partition at a time (never the whole table at once).
  Rows with ``qv`` below ``min_qv`` and control probes are dropped, as :func:`diffst.io.read_xenium` does.
* **Spot data** (Visium, Visium HD, any table of counts annotating shapes): a table (AnnData) whose
  ``uns['spatialdata_attrs']`` names the shapes it annotates (``region``, ``region_key``, ``instance_key``);
  the spot centres are the shapes' centres (circles: their points; polygons: their centroids).
* **The image**: one image element, opened lazily (a dask array per pyramid level); tiles read only the
  pixels under them, from the coarsest level fine enough (:class:`diffst.core.image.SlideImage`).

Elements are chosen automatically when that is unambiguous (points before a table; images named
``morphology_focus``, ``morphology_mip``, ``*_full_image``, ``*_hires_image``, ``*_lowres_image`` in that
order); otherwise an :class:`~diffst.errors.InputError` lists the choices and the option that picks one. On
the command line an element is picked by giving its folder: ``STORE.zarr/tables/square_008um`` (or
``/points/NAME``, ``/shapes/NAME``), and the image by ``--image NAME``.

Frame
-----
Every element has transformations to named coordinate systems. Expression element and image must share one
(``coordinate_system``; by default ``global`` when both are in it, else the one they share). The map from the
expression element's own coordinates to image pixels follows from the two transformations, so images that
live only in ``downscaled_hires`` (spatialdata-io's Visium hires / lowres images) are placed right too.
Microns then come from

* points: their own coordinates, which are microns for Xenium (spatialdata-io keeps ``x_location`` /
  ``y_location`` and maps them to the ``global`` pixel frame by a scale of 1 / pixel size);
* Visium spots: circles of radius ``r`` are 55 µm spots (pitch 100 µm), so one unit is ``55 / (2 r)`` µm;
* Visium HD bins: squares named ``*square_008um`` (or the table ``square_008um``) are 8 µm wide;
* ``pixel_size_um``, when given: microns per pixel of the chosen image's full-resolution level; it overrides
  the above (spot diameters then follow from the circles' radii).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diffst.core.image import SlideImage, positive_number
from diffst.core.sample import Sample, SpotTable
from diffst.errors import GeometryError, InputError
from diffst.io.anndata_reader import check_raw_counts, spot_pitch_um
from diffst.io.visium import VISIUM_SPOT_DIAMETER_UM, make_unique
from diffst.io.xenium import CONTROL_PREFIXES

log = logging.getLogger("diffst.io")

ELEMENT_KINDS = ("images", "labels", "points", "shapes", "tables")
_FEATURE_COLUMNS = ("feature_name", "gene", "target", "gene_name")
# Image element names in order of preference (exact name or suffix).
_IMAGE_PREFERENCE = ("morphology_focus", "morphology_mip", "_full_image", "_hires_image", "_hires",
                     "_lowres_image", "_lowres")
_HD_BIN = re.compile(r"square_(\d+)um")


def _require(module: str) -> Any:
    """Import a package of the ``spatial`` extra, or say how to install it."""
    from diffst.io.spatialdata_out import require_spatial

    return require_spatial(module, action="Reading", instead="pass the platform's own output folder")


# ---------------------------------------------------------------------------------------------- detection
def _is_zarr_group(path: Path) -> bool:
    return (path / ".zgroup").is_file() or (path / "zarr.json").is_file()


def is_spatialdata_store(path: str | Path) -> bool:
    """Tell whether ``path`` is the root folder of a SpatialData zarr store (a zarr group with element groups)."""
    path = Path(path)
    if not path.is_dir() or not _is_zarr_group(path):
        return False
    return any((path / kind).is_dir() for kind in ("images", "points", "shapes", "tables"))


def split_store_path(path: str | Path) -> tuple[Path, dict[str, str]]:
    """Split ``STORE/KIND/NAME`` (an element's folder) into the store root and ``{KIND: NAME}``.

    A store root gives ``(root, {})``. Raises InputError when ``path`` is neither.
    """
    path = Path(path)
    if is_spatialdata_store(path):
        return path, {}
    kind, root = path.parent.name, path.parent.parent
    if path.is_dir() and kind in ELEMENT_KINDS and is_spatialdata_store(root):
        return root, {kind: path.name}
    raise InputError(
        f"{path} is not a SpatialData store: expected a folder with .zgroup or zarr.json and images/, points/, "
        "shapes/ or tables/ inside (as spatialdata.SpatialData.write makes it), or one element's folder in it "
        "(STORE.zarr/tables/NAME)."
    )


def _list_elements(root: Path) -> dict[str, list[str]]:
    """Element names per kind, from the store's folders (nothing is read)."""
    out = {}
    for kind in ELEMENT_KINDS:
        folder = root / kind
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []
        out[kind] = names
    return out


# ---------------------------------------------------------------------------------------------- element reading
def _read_element(root: Path, kind: str, name: str):
    """Read one element of a store, and nothing else (spatialdata's per-element readers; whole kind as fallback).

    Images and points come back lazy (dask); shapes as a GeoDataFrame; tables as an AnnData.
    """
    sd = _require("spatialdata")
    element_path = root / kind / name
    try:
        from spatialdata._io import io_points, io_raster, io_shapes, io_table

        if kind == "points":
            return io_points._read_points(element_path)
        if kind == "shapes":
            return io_shapes._read_shapes(element_path)
        if kind == "tables":
            return io_table._read_table(element_path)
        if kind == "images":
            import zarr
            from spatialdata._io.io_zarr import get_raster_format_for_read

            attrs = zarr.open_group(root, mode="r").attrs.asdict()
            version = attrs.get("spatialdata_attrs", {}).get("version", "0.1")
            group = zarr.open_group(element_path, mode="r")
            return io_raster._read_multiscale(str(element_path), "image", get_raster_format_for_read(group, version))
    except (ImportError, AttributeError, TypeError, KeyError):  # private readers moved: read the whole kind
        pass
    except Exception as exc:
        raise InputError(f"Cannot read {kind[:-1]} '{name}' of SpatialData store {root}: {exc}. The store may be "
                         "incomplete or written by an incompatible spatialdata version.") from exc
    try:
        return sd.read_zarr(root, selection=(kind,))[name]
    except Exception as exc:
        raise InputError(f"Cannot read {kind[:-1]} '{name}' of SpatialData store {root}: {exc}.") from exc


def _transformations(element) -> dict:
    """Coordinate system -> transformation of an element."""
    from spatialdata.transformations import get_transformation

    return dict(get_transformation(element, get_all=True) or {})


def _affine(transformation) -> np.ndarray:
    """Return the 3 x 3 (x, y) affine matrix of a spatialdata transformation."""
    matrix = transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return np.asarray(matrix, dtype=float)


def _pick(kind: str, choices: Sequence[str], given: str | None, option: str, store: Path, cli: str) -> str:
    """Pick ``given`` (checked) or the single choice; else raise listing the choices and how to pick."""
    if given is not None:
        if given not in choices:
            raise InputError(f"SpatialData store {store} has no {kind} '{given}'; its {kind}s: {list(choices)}.")
        return given
    if len(choices) == 1:
        return choices[0]
    raise InputError(
        f"SpatialData store {store} holds {len(choices)} {kind}s {list(choices)}; pick one with {option}= "
        f"(read_spatialdata) or {cli}."
    )


# ---------------------------------------------------------------------------------------------- lazy image
class _LazyLevel:
    """One pyramid level of a stored image (a dask array) viewed as (rows, cols[, C]); reads only what is indexed."""

    def __init__(self, data, dims: Sequence[str]):
        dims = list(dims)
        if "y" not in dims or "x" not in dims or len(dims) not in (2, 3):
            raise InputError(f"Image dimensions {dims}; expected (c, y, x) or (y, x).")
        order = [dims.index("y"), dims.index("x")] + [i for i, d in enumerate(dims) if d not in ("y", "x")]
        arr = data.transpose(order)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        elif arr.ndim == 3 and arr.shape[2] == 4:  # RGBA: drop alpha, as spatialdata-io does
            arr = arr[..., :3]
        self._arr = arr
        self.dtype = np.dtype(arr.dtype)
        self.shape = tuple(int(s) for s in arr.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        part = self._arr[key]
        return np.asarray(part.compute() if hasattr(part, "compute") else part)


def _levels(element) -> list[_LazyLevel]:
    """Pyramid levels, finest first, of an image element (DataArray or multiscale DataTree)."""
    if hasattr(element, "dims") and hasattr(element, "data") and not hasattr(element, "children"):
        return [_LazyLevel(element.data, element.dims)]
    levels = []
    for key in sorted(element.children, key=lambda k: int(re.sub(r"\D", "", k) or 0)):
        node = element[key]
        array = next(iter(node.ds.data_vars.values())) if hasattr(node, "ds") else node["image"]
        levels.append(_LazyLevel(array.data, array.dims))
    return levels


class StoreImage(SlideImage):
    """A :class:`SlideImage` over an image element of a SpatialData store, every pyramid level read lazily."""

    def __init__(self, levels: list[_LazyLevel], um_to_px: np.ndarray, source: str):
        um_to_px = np.asarray(um_to_px, dtype=float)
        px_to_um = np.linalg.inv(um_to_px)
        pixel_size = float(np.sqrt(abs(np.linalg.det(px_to_um[:2, :2]))))
        base = levels[0]
        placeholder = np.zeros((1, 1) + tuple(base.shape[2:]), dtype=base.dtype)
        super().__init__(placeholder, pixel_size_um=pixel_size, um_to_px=um_to_px)
        self._levels = list(levels)
        linear = px_to_um[:2, :2]
        # Plain pixel size + origin (no rotation, shear or flip) is not an alignment matrix.
        self.from_matrix = not (abs(linear[0, 1]) < 1e-9 * pixel_size and abs(linear[1, 0]) < 1e-9 * pixel_size
                                and abs(linear[0, 0] / linear[1, 1] - 1) < 1e-6 and linear[0, 0] > 0)
        self.source = source

    def __repr__(self) -> str:
        rows, cols = self.shape_px
        x0, y0, x1, y1 = self.extent_um()
        return (f"StoreImage({self.source}: {rows} x {cols} px, {self.n_channels} ch {self.dtype}, "
                f"{self.pixel_size_um:g} µm/px, x {x0:.1f}-{x1:.1f} µm, y {y0:.1f}-{y1:.1f} µm, "
                f"{len(self._levels)} level(s))")


def _image_rank(name: str) -> int:
    for i, pattern in enumerate(_IMAGE_PREFERENCE):
        if name == pattern or name.endswith(pattern):
            return i
    return len(_IMAGE_PREFERENCE)


# ---------------------------------------------------------------------------------------------- reader
def read_spatialdata(
    path: str | Path,
    *,
    table: str | None = None,
    image: str | Path | None = None,
    points: str | None = None,
    shapes: str | None = None,
    coordinate_system: str | None = None,
    pixel_size_um: float | None = None,
    spot_diameter_um: float | None = None,
    pitch_um: float | None = None,
    layer: str | None = None,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    name: str | None = None,
    force_pixel_size: bool = False,
) -> Sample:
    """Read a SpatialData zarr store into a :class:`Sample` (conventions in this module's docstring).

    Parameters
    ----------
    path
        The store (``.zarr`` folder), or one element's folder in it (``STORE.zarr/tables/NAME``,
        ``/points/NAME`` or ``/shapes/NAME``), which picks that element.
    table, points
        The expression element: a table of counts (spot data) or a points element (transcripts). By default the
        single points element with a gene column, else the single table.
    shapes
        The shapes the table's rows are (default: the table's ``region``).
    image
        The image element's name (or its folder). Default: the preferred image sharing a coordinate system
        with the expression element; None of them is an error only when there are several to choose from.
    coordinate_system
        Coordinate system relating expression and image. Default ``global`` when both are in it, else the one
        they share.
    pixel_size_um
        Microns per pixel of the image's full-resolution level, when the store's own scale is not to be used
        (see the module docstring).
    spot_diameter_um, pitch_um
        Spot geometry of spot data; default Visium (55 / 100 µm) for circles, the bin size for Visium HD bins.
    layer
        Counts from ``table.layers[layer]`` instead of ``X``.
    min_qv, drop_controls
        Points only: drop transcripts with ``qv`` below ``min_qv`` and control probes (as read_xenium does).
    name
        Sample name; defaults to the store's name without ``.zarr``.
    force_pixel_size
        Points only: warn instead of raising when image and transcripts fit better at another placement.

    Returns
    -------
    Sample
        ``platform`` "xenium" (points with ``qv`` or a morphology image), "visium" (circles), "visium_hd"
        (square bins) or "spatialdata" (others); ``meta``:
        ``spatialdata_store``, the element names, ``coordinate_system``, ``um_per_unit`` (microns per unit
        of the expression element's own coordinates) and, for points, ``points_columns`` (the columns read).

    Raises
    ------
    InputError
        No expression element, several to choose from, names that do not exist, no shared coordinate system.
    GeometryError
        When the micron scale cannot be derived, or the data miss the image.
    """
    root, picked = split_store_path(path)
    for kind, value in picked.items():
        option = {"tables": "table", "points": "points", "shapes": "shapes", "images": "image"}.get(kind)
        if option is None:
            raise InputError(f"{path} is a {kind[:-1]} element; give the store, or a table, points or shapes element.")
        current = {"table": table, "points": points, "shapes": shapes, "image": image}[option]
        if current is not None and str(current) != value:
            raise InputError(f"{path} picks {option} '{value}' but {option}={current!r} was also given; give one.")
        table, points, shapes = (value if option == "table" else table, value if option == "points" else points,
                                 value if option == "shapes" else shapes)
        image = value if option == "image" else image
    _require("spatialdata")
    if image is not None:
        image = Path(str(image)).name  # a name, or an element folder STORE/images/NAME
    if pixel_size_um is not None:
        pixel_size_um = positive_number(pixel_size_um, "pixel_size_um (--pixel-size)")
    elements = _list_elements(root)
    label = name or root.name.removesuffix(".zarr")
    if table is not None and points is not None:
        raise InputError("Give table= (spot data) or points= (transcripts), not both.")

    mode, expr_name = None, None
    if points is not None:
        mode, expr_name = "points", _pick("points element", elements["points"], points, "points", root,
                                           "--input STORE/points/NAME")
    elif table is not None:
        mode, expr_name = "table", _pick("table", elements["tables"], table, "table", root, "--input STORE/tables/NAME")
    else:
        usable = [p for p in elements["points"] if _gene_column(_read_element(root, "points", p)) is not None]
        if usable:
            mode, expr_name = "points", _pick("points element", usable, None, "points", root,
                                               "--input STORE/points/NAME")
        elif elements["tables"]:
            mode, expr_name = "table", _pick("table", elements["tables"], None, "table", root,
                                              "--input STORE/tables/NAME")
    if mode is None:
        found = {k: v for k, v in elements.items() if v}
        raise InputError(
            f"SpatialData store {root} holds no expression to read: no table of counts and no points element with a "
            f"gene column (it holds {found or 'no elements'}). Diff-ST needs transcripts (a points element with x, y "
            f"and {' / '.join(_FEATURE_COLUMNS[:2])}) or spot counts (a table annotating shapes)."
        )

    if mode == "points":
        element = _read_element(root, "points", expr_name)
        expr_tf = _transformations(element)
    else:
        adata = _read_element(root, "tables", expr_name)
        shapes_name, rows = _table_region(adata, shapes, elements, root, expr_name)
        element = _read_element(root, "shapes", shapes_name)
        expr_tf = _transformations(element)
    if not expr_tf:
        raise InputError(f"The {mode} element '{expr_name}' of {root} has no coordinate transformation; write the "
                         "store with one (spatialdata.transformations.set_transformation, e.g. Identity to 'global').")
    if coordinate_system is not None and coordinate_system not in expr_tf:
        raise InputError(
            f"coordinate_system '{coordinate_system}' is not among those of the {mode} element "
            f"'{shapes_name if mode == 'table' else expr_name}' of {root}: {sorted(expr_tf)}; pass one of those."
        )

    image_name, image_element, cs = _choose_image(root, elements["images"], image, expr_tf, coordinate_system,
                                                  shapes_name if mode == "table" else expr_name)
    expr_to_px = None
    if image_element is not None:
        img_tf = _transformations(image_element)
        expr_to_px = np.linalg.inv(_affine(img_tf[cs])) @ _affine(expr_tf[cs])
    meta = {"spatialdata_store": str(root), "coordinate_system": cs, "image_element": image_name}

    if mode == "points":
        transcripts, genes, columns = _stream_points(element, root, expr_name, min_qv, drop_controls)
        if pixel_size_um is None:
            um_per_unit = 1.0  # Xenium transcripts: microns
            um_to_px = expr_to_px
        else:
            if expr_to_px is None:
                raise InputError("pixel_size_um applies to an image; the store has none.")
            xy = transcripts[["x_um", "y_um"]].to_numpy()
            px = xy @ expr_to_px[:2, :2].T + expr_to_px[:2, 2]
            transcripts["x_um"] = (px[:, 0] * pixel_size_um).astype(np.float32)
            transcripts["y_um"] = (px[:, 1] * pixel_size_um).astype(np.float32)
            um_per_unit = float(pixel_size_um * np.sqrt(abs(np.linalg.det(expr_to_px[:2, :2]))))
            um_to_px = np.diag([1 / pixel_size_um, 1 / pixel_size_um, 1.0])
        xenium_like = "qv" in columns or (image_name or "").startswith("morphology")
        sample_image = _open_image(image_element, um_to_px, root, image_name)
        sample = Sample(name=label, genes=genes, image=sample_image, transcripts=transcripts,
                        platform="xenium" if xenium_like else "spatialdata",
                        meta={**meta, "points_element": expr_name, "points_columns": columns, "min_qv": min_qv,
                              "um_per_unit": um_per_unit})
        sample.check_registration()
        sample.check_placement(strict=not force_pixel_size)
        return sample

    counts, genes, ids = _table_counts(adata, rows, layer, expr_name)
    centres, size, kind = _shape_geometry(element, adata, rows, shapes_name)
    bin_match = _HD_BIN.search(shapes_name) or _HD_BIN.search(expr_name)
    hd = bin_match is not None and kind == "square"
    if pixel_size_um is not None:
        if expr_to_px is None:
            raise InputError("pixel_size_um applies to an image; the store has none.")
        um_per_unit = float(pixel_size_um * np.sqrt(abs(np.linalg.det(expr_to_px[:2, :2]))))
        derived = size * um_per_unit if size else None
        diameter = spot_diameter_um or (float(bin_match.group(1)) if hd else derived)
    elif spot_diameter_um is not None or hd or kind == "circle":
        diameter = float(spot_diameter_um or (float(bin_match.group(1)) if hd else VISIUM_SPOT_DIAMETER_UM))
        if not size:
            raise GeometryError(f"The shapes '{shapes_name}' of {root} have no size (radius 0); pass pixel_size_um "
                                "(--pixel-size), the microns per pixel of the image.")
        um_per_unit = diameter / size
        derived = None
    else:
        raise GeometryError(
            f"Cannot tell the micron scale of the shapes '{shapes_name}' of {root}: they are neither Visium spots "
            "(circles with a radius) nor Visium HD bins (squares named *square_NNNum). Pass pixel_size_um "
            "(--pixel-size), the microns per pixel of the image's full-resolution level, or spot_diameter_um."
        )
    if pitch_um is None:
        pitch_um = spot_pitch_um(diameter, hd)
    xy_um = centres * um_per_unit
    um_to_px = None if expr_to_px is None else expr_to_px @ np.diag([1 / um_per_unit, 1 / um_per_unit, 1.0])
    sample_image = _open_image(image_element, um_to_px, root, image_name)
    spots = SpotTable(counts=counts, xy_um=xy_um, diameter_um=float(diameter or 0.0), pitch_um=pitch_um, ids=ids)
    platform = "visium_hd" if hd else ("visium" if kind == "circle" else "spatialdata")
    sample = Sample(name=label, genes=genes, image=sample_image, spots=spots, platform=platform,
                    meta={**meta, "table_element": expr_name, "shapes_element": shapes_name, "layer": layer,
                          "um_per_unit": um_per_unit})
    try:
        sample.check_registration()
    except GeometryError as exc:
        raise GeometryError(
            f"{exc} The store's spots were placed assuming {diameter:g} µm {'bins' if hd else 'spots'}; if that is "
            "wrong, pass spot_diameter_um, or pixel_size_um (--pixel-size) for the image."
        ) from exc
    return sample


def _gene_column(points) -> str | None:
    """Gene column of a points element: its ``feature_key`` attribute, else a usual name; None without one."""
    attrs = getattr(points, "attrs", {}).get("spatialdata_attrs", {}) or {}
    key = attrs.get("feature_key")
    if key and key in points.columns:
        return key
    return next((c for c in _FEATURE_COLUMNS if c in points.columns), None)


def _stream_points(ddf, root: Path, name: str, min_qv: float | None, drop_controls: bool):
    """Read x, y, gene (and qv, overlaps_nucleus) one partition at a time; filter as read_xenium does.

    Returns ``(transcripts, genes, columns read)``; transcripts hold ``gene`` (int16 codes into the sorted gene
    names; int32 beyond 32767 genes), ``x_um``, ``y_um`` (float32, the element's own coordinates) and
    ``overlaps_nucleus`` (int8) when stored: about 11 bytes per transcript.
    """
    feature = _gene_column(ddf)
    if feature is None:
        raise InputError(f"The points element '{name}' of {root} has no gene column ({', '.join(_FEATURE_COLUMNS)}).")
    missing = [c for c in ("x", "y") if c not in ddf.columns]
    if missing:
        raise InputError(f"The points element '{name}' of {root} lacks the coordinate column(s) {missing}.")
    extras = [c for c in ("qv", "overlaps_nucleus") if c in ddf.columns]
    columns = ["x", "y", feature, *extras]
    parts, n_rows, n_low, n_controls = [], 0, 0, 0
    for delayed in ddf[columns].to_delayed():
        part = delayed.compute()
        n_rows += len(part)
        names = part[feature]
        if names.isna().any():
            raise InputError(f"The points element '{name}' of {root}: {int(names.isna().sum())} transcript(s) have no "
                             f"{feature}; every transcript needs its gene name.")
        if not isinstance(names.dtype, pd.CategoricalDtype):
            values = names.to_numpy()
            if len(values) and isinstance(values[0], bytes):
                values = np.array([v.decode("utf-8") for v in values], dtype=object)
            names = pd.Series(pd.Categorical(values.astype(str)), index=part.index)
        cats = names.cat.categories.astype(str)
        keep = np.ones(len(part), dtype=bool)
        if "qv" in part.columns and min_qv is not None:
            low = ~(pd.to_numeric(part["qv"], errors="coerce").to_numpy(dtype=float) >= min_qv)
            n_low += int(low.sum())
            keep &= ~low
        if drop_controls:
            control_cat = np.asarray(cats.str.startswith(CONTROL_PREFIXES), dtype=bool)
            codes = names.cat.codes.to_numpy()
            control = np.zeros(len(part), dtype=bool) if not control_cat.any() else control_cat[codes]
            n_controls += int((control & keep).sum())
            keep &= ~control
        kept = pd.DataFrame({"gene": pd.Categorical.from_codes(names.cat.codes.to_numpy()[keep], categories=cats),
                             "x_um": pd.to_numeric(part["x"], errors="coerce").to_numpy(dtype=np.float32)[keep],
                             "y_um": pd.to_numeric(part["y"], errors="coerce").to_numpy(dtype=np.float32)[keep]})
        if "overlaps_nucleus" in part.columns:  # qv only filters; like read_xenium, it is not kept
            flag = pd.to_numeric(part["overlaps_nucleus"], errors="coerce").to_numpy(dtype=float)[keep]
            kept["overlaps_nucleus"] = np.where(np.isnan(flag), -1, flag != 0).astype(np.int8)
        parts.append(kept)
    if not parts or not sum(len(p) for p in parts):
        raise InputError(
            f"No transcripts left in the points element '{name}' of {root}: {n_rows} read, {n_low} removed by qv < "
            f"min_qv ({min_qv}), {n_controls} more removed as control probes. Lower min_qv (read_spatialdata) or keep "
            "controls with drop_controls=False."
        )
    genes = sorted(set().union(*(set(p["gene"].cat.remove_unused_categories().cat.categories) for p in parts)))
    code_type = np.int16 if len(genes) <= np.iinfo(np.int16).max else np.int32
    for p in parts:
        p["gene"] = p["gene"].cat.set_categories(genes).cat.codes.astype(code_type)
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    bad = ~np.isfinite(table[["x_um", "y_um"]].to_numpy()).all(axis=1)
    if bad.any():
        raise GeometryError(f"The points element '{name}' of {root} has empty, NaN or infinite x / y in {int(bad.sum())} "
                            f"of {len(table)} rows; drop or fix those rows.")
    return table, genes, columns


def _table_region(adata, shapes: str | None, elements: dict, root: Path, table: str) -> tuple[str, np.ndarray]:
    """Find the shapes element a table annotates and the table rows that annotate it."""
    attrs = adata.uns.get("spatialdata_attrs", {}) or {}
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    region_key = attrs.get("region_key")
    if not regions:
        raise InputError(
            f"The table '{table}' of {root} annotates no element (uns['spatialdata_attrs']['region'] is empty), so its "
            "rows have no positions; write it with spatialdata.models.TableModel.parse(..., region=SHAPES_NAME, "
            "region_key=..., instance_key=...)."
        )
    shape_regions = [r for r in regions if r in elements["shapes"]]
    if not shape_regions:
        raise InputError(
            f"The table '{table}' of {root} annotates {regions}, which are not shapes of the store (shapes: "
            f"{elements['shapes']}); Diff-ST reads spot tables whose rows are shapes (circles, squares, polygons)."
        )
    chosen = _pick("region of the table", shape_regions, shapes, "shapes", root, "--input STORE/shapes/NAME")
    if region_key and region_key in adata.obs.columns and len(regions) > 1:
        rows = np.flatnonzero((adata.obs[region_key].astype(str) == chosen).to_numpy())
    else:
        rows = np.arange(adata.n_obs)
    if not len(rows):
        raise InputError(f"No row of the table '{table}' of {root} annotates the shapes '{chosen}'.")
    return chosen, rows


def _table_counts(adata, rows: np.ndarray, layer: str | None, table: str):
    """Raw counts (CSR), unique gene names and row ids of the table rows ``rows``."""
    if layer is None:
        matrix, what = adata.X, f"table '{table}' X"
    else:
        if layer not in adata.layers:
            raise InputError(f"The table '{table}' has no layer '{layer}' (layers: {list(adata.layers.keys())}).")
        matrix, what = adata.layers[layer], f"table '{table}' layers['{layer}']"
    if matrix is None:
        raise InputError(f"The {what} is empty; pass layer= the layer holding raw counts.")
    matrix = matrix[rows] if len(rows) != adata.n_obs else matrix
    matrix = matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))
    check_raw_counts(matrix, what)
    genes = list(map(str, adata.var_names))
    if len(set(genes)) != len(genes):
        genes = make_unique(genes)
    ids = np.asarray(adata.obs_names).astype(str)[rows]
    return matrix, genes, ids


def _shape_geometry(shapes, adata, rows: np.ndarray, name: str) -> tuple[np.ndarray, float, str]:
    """Centres (n, 2) of the shapes the table rows annotate, in the shapes' own units; size and kind.

    ``size`` is the spot diameter (circles: 2 x median radius; squares: median side) in the same units, 0 when
    unknown; ``kind`` is "circle", "square" or "polygon".
    """
    attrs = adata.uns.get("spatialdata_attrs", {}) or {}
    instance_key = attrs.get("instance_key")
    geometry = shapes.geometry
    if instance_key and instance_key in adata.obs.columns:
        ids = adata.obs[instance_key].to_numpy()[rows]
        position = pd.Series(np.arange(len(shapes)), index=shapes.index)
        if position.index.has_duplicates:
            raise InputError(f"The shapes '{name}' have duplicate indices; each spot needs its own instance id.")
        found = position.reindex(ids)
        if found.isna().any():
            missing = ids[found.isna().to_numpy()][:3].tolist()
            raise InputError(f"{int(found.isna().sum())} table rows (e.g. instance ids {missing}) have no shape in "
                             f"'{name}': table and shapes do not belong together.")
        take = found.to_numpy(dtype=np.int64)
    else:
        if len(shapes) != len(rows):
            raise InputError(f"The table has {len(rows)} rows for the {len(shapes)} shapes '{name}' and no "
                             "instance_key to match them.")
        take = np.arange(len(rows))
    types = set(geometry.geom_type.iloc[take].unique()) if len(take) else set()
    if types == {"Point"}:
        if "radius" not in shapes.columns:
            raise InputError(f"The shapes '{name}' are points without a radius; expected circles (a 'radius' column).")
        centres = np.column_stack([geometry.x.to_numpy()[take], geometry.y.to_numpy()[take]])
        radius = np.asarray(shapes["radius"], dtype=float)[take]
        return centres, float(2 * np.median(radius)), "circle"
    centroid = geometry.iloc[take].centroid
    centres = np.column_stack([centroid.x.to_numpy(), centroid.y.to_numpy()])
    bounds = geometry.iloc[take].bounds.to_numpy()
    widths, heights = bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]
    area = geometry.iloc[take].area.to_numpy()
    square = bool(np.allclose(area, widths * heights, rtol=1e-3)) and bool(np.allclose(widths, heights, rtol=1e-3))
    return centres, float(np.median(widths)) if square else 0.0, "square" if square else "polygon"


def _choose_image(root: Path, names: list[str], image: str | None, expr_tf: dict, coordinate_system: str | None,
                  expr_name: str):
    """Return ``(image name, element, coordinate system)``; (None, None, cs) when the store has no image."""
    if image is not None and image not in names:
        raise InputError(f"SpatialData store {root} has no image '{image}'; its images: {names}.")
    candidates = [image] if image is not None else names
    if not candidates:
        log.warning("SpatialData store %s holds no image; the sample has none.", root)
        systems = [coordinate_system] if coordinate_system else sorted(expr_tf)
        return None, None, "global" if "global" in systems else systems[0]
    opened = {n: _read_element(root, "images", n) for n in candidates}
    shared = {}
    for n, element in opened.items():
        common = set(_transformations(element)) & set(expr_tf)
        if coordinate_system is not None:
            common &= {coordinate_system}
        if common:
            shared[n] = "global" if "global" in common else sorted(common)[0]
    if not shared:
        where = {n: sorted(_transformations(e)) for n, e in opened.items()}
        wanted = f"coordinate system '{coordinate_system}'" if coordinate_system else "coordinate system"
        raise InputError(
            f"No image of SpatialData store {root} shares a {wanted} with the expression element '{expr_name}' "
            f"(which is in {sorted(expr_tf)}; images: {where}), so the two cannot be placed on each other. Give the "
            "image a transformation to one of those (spatialdata.transformations.set_transformation) or pass "
            "coordinate_system= one they share."
        )
    if len(shared) > 1:
        best = min(_image_rank(n) for n in shared)
        ranked = [n for n in shared if _image_rank(n) == best]
        if len(ranked) > 1:  # e.g. several Visium libraries: prefer the one named like the spots
            ranked = [n for n in ranked if n.startswith(expr_name)] or ranked
        if len(ranked) > 1 or best == len(_IMAGE_PREFERENCE):
            raise InputError(
                f"SpatialData store {root} holds {len(shared)} images that fit the expression element '{expr_name}': "
                f"{sorted(shared)}; pick one with image= (read_spatialdata) or --image NAME (command line)."
            )
        chosen = ranked[0]
    else:
        chosen = next(iter(shared))
    return chosen, opened[chosen], shared[chosen]


def _open_image(element, um_to_px: np.ndarray | None, root: Path, name: str | None) -> SlideImage | None:
    if element is None:
        return None
    um_to_px = np.asarray(um_to_px, dtype=float)
    if not np.all(np.isfinite(um_to_px)) or abs(np.linalg.det(um_to_px[:2, :2])) < 1e-12:
        raise GeometryError(f"The transformations of image '{name}' of {root} do not give an invertible placement.")
    return StoreImage(_levels(element), um_to_px, f"{root.name}/images/{name}")
