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
    image: str | Path | np.ndarray | SlideImage | None,
    pixel_size_um: float | None,
    *,
    spatial_key: str = "spatial",
    coords_unit: str = "px",
    spot_diameter_um: float | None = None,
    pitch_um: float | None = None,
    layer: str | None = None,
    name: str | None = None,
) -> Sample:
    """Turn an AnnData (in memory or ``.h5ad``) with coordinates and an image into a :class:`Sample`.

    Parameters
    ----------
    adata_or_path
        An ``anndata.AnnData`` or the path of an ``.h5ad`` file.
    image
        The registered image: a path, an array or a :class:`SlideImage` (then used as is, and
        ``pixel_size_um`` only converts pixel coordinates). None for no image.
    pixel_size_um
        Microns per image pixel. Required when coordinates are in pixels or the image is a
        path / array.
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

    Returns
    -------
    Sample
        ``platform`` "anndata"; ``spots``: counts CSR (obs x var), ``xy_um``, ``ids`` = obs names;
        ``genes`` = var names; ``image`` a :class:`SlideImage` with origin (0, 0); ``meta``:
        ``layer``, ``spatial_key``, ``coords_unit``.
    """
    import anndata as ad

    label = name
    if isinstance(adata_or_path, str | Path):
        path = Path(adata_or_path)
        if not path.exists():
            raise InputError(f"AnnData file not found: {path}. Expected an .h5ad file.")
        try:
            adata = ad.read_h5ad(path)
        except Exception as exc:
            raise InputError(f"Cannot read {path} as .h5ad ({exc}); the file is corrupt or not AnnData.") from exc
        label = label or path.stem
    elif isinstance(adata_or_path, ad.AnnData):
        adata = adata_or_path
    else:
        raise InputError(f"Expected an AnnData or an .h5ad path, got {type(adata_or_path).__name__}.")
    label = label or "anndata"

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
    if pixel_size_um is not None:
        pixel_size_um = positive_number(pixel_size_um, "pixel_size_um (--pixel-size)")
    if isinstance(image, SlideImage):
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
        if isinstance(image, SlideImage):
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
        meta={"layer": layer, "spatial_key": spatial_key, "coords_unit": coords_unit},
    )
    sample.check_registration()
    return sample
