"""Any AnnData with spot / cell / bin coordinates in ``obsm['spatial']`` plus its registered image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from diffst.core.image import SlideImage, positive_number
from diffst.core.sample import Sample, SpotTable
from diffst.errors import GeometryError, InputError


def check_raw_counts(matrix, what: str = "X") -> None:
    """Raise unless ``matrix`` holds finite, non-negative, integer-valued counts.

    The messages tell apart the usual mistakes: NaN / inf values, negative values (scaled or
    centred data) and fractional values (log-normalised or size-factor normalised data).
    """
    data = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
    if data.size == 0:
        return
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{what} holds {data.dtype} values; expected numeric raw counts.")
    if np.issubdtype(data.dtype, np.integer):
        if data.min() < 0:
            raise InputError(
                f"{what} contains negative counts (min {data.min()}); expected raw non-negative counts. "
                "Pass raw counts via layer= (e.g. layer='counts')."
            )
        return
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(
            f"{what} contains {int((~finite).sum())} NaN or infinite value(s); expected finite raw counts. "
            "Drop or fill those entries, or pass raw counts via layer=."
        )
    if data.min() < 0:
        raise InputError(
            f"{what} contains negative values (min {data.min():.3g}): it looks scaled or centred, not raw counts. "
            "Pass raw counts via layer= (e.g. layer='counts') or adata.raw."
        )
    frac = np.abs(data - np.round(data)) > 1e-6
    if frac.any():
        hint = (
            "looks log-normalised" if data.max() < 30 else "looks normalised (size factors or CPM)"
        )
        raise InputError(
            f"{what} holds non-integer values ({int(frac.sum())} entries, e.g. {data[frac][0]:.4g}; max {data.max():.3g}): "
            f"it {hint}; pass raw counts via layer= (e.g. layer='counts')."
        )


def read_anndata(
    adata_or_path,
    image: str | Path | np.ndarray | SlideImage | None = "auto",
    pixel_size_um: float | None = None,
    *,
    spatial_key: str = "spatial",
    coords_unit: str = "px",
    spot_diameter_um: float | None = None,
    pitch_um: float | None = None,
    layer: str | None = None,
    name: str | None = None,
    library_id: str | None = None,
) -> Sample:
    """Turn an AnnData (in memory or ``.h5ad``) with coordinates and an image into a :class:`Sample`.

    Parameters
    ----------
    adata_or_path
        An ``anndata.AnnData`` or the path of an ``.h5ad`` file.
    image
        The registered image: a path, an array or a :class:`SlideImage` (then used as is, and
        ``pixel_size_um`` only converts pixel coordinates). None for no image. ``"auto"`` (default): the
        image the AnnData carries in ``uns['spatial'][library]['images']`` (``hires``, else ``lowres``),
        placed by its ``scalefactors`` as scanpy / squidpy Visium data and Diff-ST predictions hold it; then
        ``obsm[spatial_key]`` are full-resolution pixels (``coords_unit`` must be "px").
    pixel_size_um
        Microns per image pixel. Required when coordinates are in pixels or the image is a
        path / array. With the image from ``uns['spatial']`` it is the microns per *full-resolution* pixel
        (the unit of ``obsm['spatial']``), and optional: by default ``scalefactors['microns_per_pixel']``
        when present, else ``spot_diameter_um / scalefactors['spot_diameter_fullres']`` with the spot
        diameter given, the ``bin_size_um`` of the scale factors, or Visium's 55 µm.
    spatial_key
        Key of the (n_obs, 2) coordinates in ``obsm`` (x = column, y = row).
    coords_unit
        ``"px"``: coordinates are pixels of ``image`` (the scanpy / squidpy convention for
        full-resolution images); ``"um"``: microns in the image's frame.
    spot_diameter_um, pitch_um
        Spot geometry (None / 0 for cells); with ``pitch_um`` the spot spacing is checked.
    layer
        Read counts from ``adata.layers[layer]`` (``"raw"`` means ``adata.raw.X``) instead of ``X``.
    name
        Sample name; defaults to the file name or ``"anndata"``.
    library_id
        With the image from ``uns['spatial']``: which library, when it holds several (rows are then those
        whose ``obs['library_id']`` is it, if that column exists).

    Returns
    -------
    Sample
        ``platform`` "anndata"; ``spots``: counts CSR (obs x var), ``xy_um``, ``ids`` = obs names;
        ``genes`` = var names; ``image`` a :class:`SlideImage` with origin (0, 0); ``meta``:
        ``layer``, ``spatial_key``, ``coords_unit``, ``anndata_file`` (when read from a file) and, for an
        image from ``uns['spatial']``, ``library_id``, ``image_kind``, ``um_per_fullres_px``, ``scalefactors``.
    """
    import anndata as ad

    label, source = name, {}
    if isinstance(adata_or_path, str | Path):
        path = Path(adata_or_path)
        if not path.exists():
            raise InputError(f"AnnData file not found: {path}. Expected an .h5ad file.")
        try:
            adata = ad.read_h5ad(path)
        except Exception as exc:
            raise InputError(f"Cannot read {path} as .h5ad ({exc}); the file is corrupt or not AnnData.") from exc
        label = label or path.stem
        source = {"anndata_file": str(path)}  # named in the provenance of predictions from it
    elif isinstance(adata_or_path, ad.AnnData):
        adata = adata_or_path
    else:
        raise InputError(f"Expected an AnnData or an .h5ad path, got {type(adata_or_path).__name__}.")
    label = label or "anndata"
    if pixel_size_um is not None:
        pixel_size_um = positive_number(pixel_size_um, "pixel_size_um (--pixel-size)")
    carried = None
    if isinstance(image, str) and image == "auto":
        carried = image_from_uns(adata, label, library_id=library_id, pixel_size_um=pixel_size_um,
                                 spot_diameter_um=spot_diameter_um)
        if carried is None:
            raise InputError(
                f"The AnnData {label} carries no image (no uns['spatial'][library]['images'] with 'scalefactors', as "
                "scanpy / squidpy keep Visium data); pass image= (--image), the registered image, and pixel_size_um= "
                "(--pixel-size), its microns per pixel."
            )
        if coords_unit != "px":
            raise InputError("The image in uns['spatial'] is placed by full-resolution pixel coordinates; use "
                             "coords_unit='px' with it, or pass image= explicitly.")
        if carried["rows"] is not None:
            adata = adata[carried["rows"]]
        spot_diameter_um = carried["spot_diameter_um"] if spot_diameter_um is None else spot_diameter_um
        pitch_um = carried["pitch_um"] if pitch_um is None else pitch_um

    if spatial_key not in adata.obsm:
        raise InputError(
            f"adata.obsm has no '{spatial_key}' (keys: {list(adata.obsm.keys())}); pass spatial_key= the key of the "
            "(n_obs, 2) spot coordinates."
        )
    if adata.n_obs == 0:
        raise InputError(f"The AnnData {label} has no observations (0 spots / cells); nothing to read.")
    try:
        coords = np.asarray(adata.obsm[spatial_key], dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"adata.obsm['{spatial_key}'] holds non-numeric values ({exc}); expected (n_obs, 2) numbers (x, y)."
        ) from exc
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] < 2:
        raise InputError(
            f"adata.obsm['{spatial_key}'] has shape {coords.shape}; expected ({adata.n_obs}, 2) (x, y) per observation."
        )
    coords = coords[:, :2]
    if not np.all(np.isfinite(coords)):
        bad = int((~np.isfinite(coords).all(axis=1)).sum())
        raise GeometryError(
            f"adata.obsm['{spatial_key}'] has NaN or infinite coordinates for {bad} observation(s); drop them first "
            "(e.g. adata = adata[np.isfinite(adata.obsm['spatial']).all(1)])."
        )

    if layer is None:
        matrix, what = adata.X, "adata.X"
    elif layer == "raw":
        if adata.raw is None:
            raise InputError("layer='raw' but adata.raw is None; pass the layer holding raw counts.")
        matrix, what = adata.raw.X, "adata.raw.X"
        if adata.raw.n_vars != adata.n_vars:
            raise InputError(
                f"adata.raw has {adata.raw.n_vars} genes but adata has {adata.n_vars}; subset adata.raw to adata.var_names first."
            )
    else:
        if layer not in adata.layers:
            raise InputError(f"adata.layers has no '{layer}' (layers: {list(adata.layers.keys())}).")
        matrix, what = adata.layers[layer], f"adata.layers['{layer}']"
    if matrix is None:
        raise InputError(f"{what} is empty; pass layer= the layer holding raw counts.")
    if not sp.issparse(matrix):
        matrix = np.asarray(matrix)
    if matrix.shape != (adata.n_obs, adata.n_vars):
        raise InputError(f"{what} has shape {matrix.shape}; expected ({adata.n_obs}, {adata.n_vars}) (obs x var).")
    check_raw_counts(matrix, what)

    if coords_unit not in ("px", "um"):
        raise InputError(f"coords_unit={coords_unit!r}; expected 'px' (image pixels) or 'um' (microns).")
    if carried is not None:
        slide_image, px_size = carried["image"], carried["um_per_fullres_px"]
    elif isinstance(image, SlideImage):
        slide_image = image
        px_size = pixel_size_um if pixel_size_um is not None else image.pixel_size_um
    else:
        if pixel_size_um is None and (image is not None or coords_unit == "px"):
            raise GeometryError(
                "pixel_size_um is required: the microns per pixel of the image the coordinates refer to "
                "(for Visium full-resolution images, 55 / spot_diameter_fullres)."
            )
        px_size = pixel_size_um
        slide_image = SlideImage(image, pixel_size_um=pixel_size_um) if image is not None else None
    if coords_unit == "px":
        if isinstance(image, SlideImage) and carried is None:
            xy_um = coords @ image.px_to_um[:2, :2].T + image.px_to_um[:2, 2]
        else:
            xy_um = coords * float(px_size)
    else:
        xy_um = coords

    counts = matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(matrix)
    spots = SpotTable(
        counts=counts,
        xy_um=xy_um,
        diameter_um=float(spot_diameter_um or 0.0),
        pitch_um=pitch_um,
        ids=np.asarray(adata.obs_names).astype(str),
    )
    sample = Sample(
        name=str(label),
        genes=list(map(str, adata.var_names)),
        image=slide_image,
        spots=spots,
        platform="anndata",
        meta={"layer": layer, "spatial_key": spatial_key, "coords_unit": coords_unit, **source,
              **({k: carried[k] for k in ("library_id", "image_kind", "um_per_fullres_px", "scalefactors")}
                 if carried else {})},
    )
    sample.check_registration()
    return sample


# Visium spots and their pitch; legacy ST spots (100 µm on a 200 µm pitch) as written in the Visium layout.
_SPOT_PITCHES_UM = ((55.0, 100.0), (100.0, 200.0))
_VISIUM_SPOT_UM = 55.0


def spot_pitch_um(diameter_um: float | None, binned: bool = False) -> float | None:
    """Return the array pitch that goes with a spot diameter.

    The bin itself for square bins (Visium HD), Visium's 100 µm for 55 µm spots, legacy ST's 200 µm for 100 µm
    spots (within 10 %); None otherwise (the spacing is then not checked).
    """
    if diameter_um is None:
        return None
    if binned:
        return float(diameter_um)
    for diameter, pitch in _SPOT_PITCHES_UM:
        if abs(diameter_um / diameter - 1) < 0.1:
            return pitch
    return None


def _display_array(array, where: str) -> np.ndarray:
    """Convert an image array from ``uns['spatial']`` to uint8 / uint16 (rows, cols[, 3]); floats in [0, 1] become uint8."""
    try:
        array = np.asarray(array)
    except Exception as exc:
        raise InputError(f"{where} is not an image array ({exc}).") from exc
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]  # RGBA PNG: drop alpha
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3)) or min(array.shape[:2]) < 1:
        raise InputError(f"{where} has shape {array.shape}; expected (rows, cols) or (rows, cols, 3).")
    if np.issubdtype(array.dtype, np.floating):
        finite = array[np.isfinite(array)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1.0:  # matplotlib / scanpy read PNGs as [0, 1]
            return np.round(np.nan_to_num(array) * 255).astype(np.uint8)
        return array.astype(np.float32)
    if array.dtype not in (np.uint8, np.uint16):
        if array.min() >= 0 and array.max() <= 255:
            return array.astype(np.uint8)
        raise InputError(f"{where} holds {array.dtype} values beyond 0-255; expected uint8 / uint16 or floats in [0, 1].")
    return array


def image_from_uns(adata, label: str, *, library_id: str | None = None, pixel_size_um: float | None = None,
                   spot_diameter_um: float | None = None) -> dict | None:
    """Return the image an AnnData carries in ``uns['spatial']`` (scanpy / squidpy / Diff-ST layout), placed in microns.

    ``uns['spatial'][library]`` holds ``images`` (``hires`` / ``lowres`` arrays) and ``scalefactors``
    (``tissue_hires_scalef``: image pixels per full-resolution pixel; ``spot_diameter_fullres``; optionally
    ``microns_per_pixel`` and ``bin_size_um``). ``obsm['spatial']`` are full-resolution pixels, so microns are
    those times the full-resolution pixel size, and the image's pixel size is that over its scale factor.

    Returns
    -------
    dict or None
        None when there is no such image; else ``image`` (:class:`SlideImage`, origin (0, 0)),
        ``um_per_fullres_px``, ``spot_diameter_um``, ``pitch_um``, ``library_id``, ``image_kind``,
        ``scalefactors`` and ``rows`` (a boolean mask of the library's rows, or None for all).

    Raises
    ------
    InputError
        Several libraries and no ``library_id``; images without their scale factor.
    GeometryError
        When the full-resolution pixel size cannot be derived.
    """
    spatial = adata.uns.get("spatial") if hasattr(adata, "uns") else None
    if not isinstance(spatial, dict) or not spatial:
        return None
    with_images = [k for k, v in spatial.items() if isinstance(v, dict) and v.get("images")]
    if not with_images:
        return None
    if library_id is not None:
        if library_id not in spatial:
            raise InputError(f"library_id '{library_id}' is not in uns['spatial'] of {label} (libraries: {list(spatial)}).")
        library = library_id
    elif len(with_images) == 1:
        library = with_images[0]
    else:
        raise InputError(
            f"uns['spatial'] of {label} holds {len(with_images)} libraries with images {with_images}; pass library_id= "
            "(read_anndata) or write one library per .h5ad (e.g. adata[adata.obs['library_id'] == LIB])."
        )
    entry = spatial[library]
    images = entry.get("images") or {}
    factors = {k: (float(v) if np.ndim(v) == 0 and isinstance(v, int | float | np.number) else v)
               for k, v in dict(entry.get("scalefactors") or {}).items()}
    kind = next((k for k in ("hires", "lowres") if k in images), None) or (next(iter(images)) if len(images) == 1 else None)
    if kind is None:
        raise InputError(f"uns['spatial']['{library}']['images'] of {label} holds {list(images)}; expected 'hires' or 'lowres'.")
    scale_key = f"tissue_{kind}_scalef"
    if scale_key not in factors:
        raise InputError(
            f"uns['spatial']['{library}']['scalefactors'] of {label} lacks {scale_key} (keys: {sorted(factors)}), "
            f"needed to place the {kind} image; add it (image pixels per full-resolution pixel) or pass image=."
        )
    scalef = positive_number(factors[scale_key], f"uns['spatial']['{library}']['scalefactors']['{scale_key}']")
    binned = "bin_size_um" in factors
    diameter_fullres = factors.get("spot_diameter_fullres")
    if pixel_size_um is not None:
        um_per_px, known_px = float(pixel_size_um), True
    elif factors.get("microns_per_pixel"):
        um_per_px, known_px = positive_number(factors["microns_per_pixel"], "scalefactors['microns_per_pixel']"), True
    elif diameter_fullres:
        assumed = spot_diameter_um or (float(factors["bin_size_um"]) if binned else _VISIUM_SPOT_UM)
        um_per_px, known_px = float(assumed) / positive_number(diameter_fullres, "scalefactors['spot_diameter_fullres']"), False
    else:
        raise GeometryError(
            f"Cannot tell the pixel size of {label}: uns['spatial']['{library}']['scalefactors'] has neither "
            "microns_per_pixel nor spot_diameter_fullres. Pass pixel_size_um (--pixel-size), the microns per "
            "full-resolution pixel (the unit of obsm['spatial'])."
        )
    if spot_diameter_um is not None:
        diameter = float(spot_diameter_um)
    elif binned:
        diameter = float(factors["bin_size_um"])
    elif known_px and diameter_fullres:
        diameter = float(diameter_fullres) * um_per_px
    else:
        diameter = _VISIUM_SPOT_UM if diameter_fullres else None
    array = _display_array(images[kind], f"uns['spatial']['{library}']['images']['{kind}'] of {label}")
    rows = None
    if len(spatial) > 1 and "library_id" in getattr(adata, "obs", {}):
        rows = (adata.obs["library_id"].astype(str) == str(library)).to_numpy()
    return {"image": SlideImage(array, pixel_size_um=um_per_px / scalef), "um_per_fullres_px": um_per_px,
            "spot_diameter_um": diameter, "pitch_um": spot_pitch_um(diameter, binned), "library_id": str(library),
            "image_kind": kind, "scalefactors": {k: v for k, v in factors.items() if np.ndim(v) == 0}, "rows": rows}
