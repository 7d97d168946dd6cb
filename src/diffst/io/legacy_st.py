"""Legacy Spatial Transcriptomics (Ståhl et al. 2016 arrays; e.g. the HER2ST breast cancer data).

Layout (one section): a counts table ``<S>.tsv(.gz)`` (spots x genes, first column the spot id
``XxY`` = array column x, array row y), a spot selection table ``<S>_selection.tsv`` with columns
``x, y, new_x, new_y, pixel_x, pixel_y, selected`` (array coordinates, their registered sub-spot
positions, and the spot centres in H&E pixels), and the H&E image. Spots are 100 µm across on a
200 µm pitch. The image's pixel size is rarely recorded; it is estimated from the pitch: a least
squares fit of pixel coordinates against the registered array coordinates (new_x, new_y) gives
pixels per array step, and ``pixel_size = pitch / (pixels per step)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diffst.core.image import SlideImage
from diffst.core.sample import Sample, SpotTable
from diffst.errors import GeometryError, InputError
from diffst.io.visium import make_unique

LEGACY_PITCH_UM = 200.0
LEGACY_SPOT_DIAMETER_UM = 100.0
SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def estimate_pixel_size_um(selection: pd.DataFrame, pitch_um: float = LEGACY_PITCH_UM) -> float:
    """Microns per image pixel from a spot selection table (pixel coords vs array coords, least squares).

    Uses ``new_x``/``new_y`` (registered array coordinates) when present, else ``x``/``y``. One scale
    is fitted for both axes, with separate offsets; the per-axis scales must agree within 5 %.
    """
    ax = "new_x" if "new_x" in selection.columns else "x"
    ay = "new_y" if "new_y" in selection.columns else "y"
    a = selection[[ax, ay]].to_numpy(dtype=float)
    p = selection[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    if len(a) < 3 or np.ptp(a[:, 0]) == 0 or np.ptp(a[:, 1]) == 0:
        raise GeometryError(
            f"Cannot estimate the pixel size from {len(a)} spots spanning a single array row or column; "
            "pass pixel_size_um= (microns per image pixel)."
        )
    per_axis = []
    for k in range(2):
        design = np.column_stack([a[:, k], np.ones(len(a))])
        per_axis.append(np.linalg.lstsq(design, p[:, k], rcond=None)[0][0])
    # Joint fit: one scale, two offsets.
    n = len(a)
    design = np.zeros((2 * n, 3))
    design[:n, 0], design[n:, 0] = a[:, 0], a[:, 1]
    design[:n, 1], design[n:, 2] = 1.0, 1.0
    scale = np.linalg.lstsq(design, np.concatenate([p[:, 0], p[:, 1]]), rcond=None)[0][0]
    sx, sy = per_axis
    if scale <= 0 or not np.isfinite(scale):
        raise GeometryError(
            f"Pixel coordinates decrease along the array (fitted {scale:.1f} px per step); the selection table is "
            "flipped or corrupt. Pass pixel_size_um= explicitly."
        )
    if abs(sx - sy) > 0.05 * abs(scale):
        raise GeometryError(
            f"The image is stretched differently along x ({sx:.1f} px per array step) and y ({sy:.1f}); expected equal "
            "scales. Check the selection table's pixel_x / pixel_y, or pass pixel_size_um=."
        )
    return float(pitch_um / scale)


def read_selection(path: str | Path) -> pd.DataFrame:
    """Read a legacy ST spot selection table; returns it with a string ``id`` column ``XxY``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Spot selection table not found: {path}. Expected <sample>_selection.tsv (x, y, new_x, new_y, pixel_x, pixel_y, selected).")
    try:
        table = pd.read_csv(path, sep="\t")
    except Exception as exc:
        raise InputError(f"Cannot read {path} as a tab-separated table ({exc}).") from exc
    missing = [c for c in SELECTION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"{path} lacks column(s) {missing} (found {list(table.columns)}); expected x, y, new_x, new_y, "
            "pixel_x, pixel_y, selected."
        )
    if table[["pixel_x", "pixel_y"]].isna().any().any():
        raise GeometryError(f"{path} has NaN pixel_x / pixel_y for some spots; the registration table is incomplete.")
    table = table.copy()
    table["id"] = table["x"].astype(int).astype(str) + "x" + table["y"].astype(int).astype(str)
    return table


def read_legacy_counts(path: str | Path) -> pd.DataFrame:
    """Read a legacy ST counts table (spots x genes, first column the spot id ``XxY``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Counts table not found: {path}. Expected <sample>.tsv(.gz), spots x genes with ids XxY first.")
    try:
        table = pd.read_csv(path, sep="\t", index_col=0)
    except Exception as exc:
        raise InputError(f"Cannot read counts from {path} ({exc}); the file is corrupt or not a tab-separated table.") from exc
    if table.shape[1] == 0:
        raise InputError(f"{path} has no gene columns; expected spots x genes separated by tabs.")
    table.index = table.index.astype(str)
    return table


def read_legacy_st(
    counts_tsv: str | Path,
    selection_tsv: str | Path,
    image: str | Path | np.ndarray,
    *,
    pitch_um: float = LEGACY_PITCH_UM,
    spot_diameter_um: float = LEGACY_SPOT_DIAMETER_UM,
    pixel_size_um: float | None = None,
    name: str | None = None,
) -> Sample:
    """Read one legacy ST section (counts, selection table, H&E) into a :class:`Sample`.

    Parameters
    ----------
    counts_tsv
        Spots x genes counts (``.tsv`` or ``.tsv.gz``), first column the spot id ``XxY``.
    selection_tsv
        The spot selection table (``x, y, new_x, new_y, pixel_x, pixel_y, selected``).
    image
        The H&E image (JPEG / PNG / TIFF path, or an array) in which ``pixel_x/pixel_y`` are given.
    pitch_um, spot_diameter_um
        Array geometry (legacy ST: 200 µm pitch, 100 µm spots).
    pixel_size_um
        Microns per image pixel; estimated from the pitch when None (≈0.69 for HER2ST).
    name
        Sample name; defaults to the counts file name without suffixes.

    Returns
    -------
    Sample
        ``platform`` "legacy_st"; ``spots``: the selected spots present in both tables, counts CSR
        (spots x genes, symbols made unique), ``xy_um`` = (pixel_x, pixel_y) x pixel size,
        ``ids`` = ``XxY``; ``image``: the H&E at that pixel size with origin (0, 0); ``meta``:
        ``pixel_size_um``, ``pixel_size_estimated``, ``array_xy``, file paths.
    """
    counts_path = Path(counts_tsv)
    selection = read_selection(selection_tsv)
    if "selected" in selection.columns:
        selection = selection[selection["selected"].fillna(0).astype(int) == 1]
    if selection["id"].duplicated().any():
        dup = selection.loc[selection["id"].duplicated(), "id"].iloc[:3].tolist()
        raise InputError(f"{selection_tsv} lists spots more than once (e.g. {dup}); the table is corrupt.")
    counts = read_legacy_counts(counts_path)
    if counts.index.duplicated().any():
        dup = counts.index[counts.index.duplicated()][:3].tolist()
        raise InputError(f"{counts_path} lists spot ids more than once (e.g. {dup}); the counts table is corrupt.")
    common = selection["id"].isin(counts.index).to_numpy()
    if not common.any():
        raise InputError(
            f"No spot id of {selection_tsv} (e.g. {selection['id'].iloc[:3].tolist()}) is in {counts_path} "
            f"(e.g. {counts.index[:3].tolist()}): the files belong to different sections or use another id format (XxY)."
        )
    if common.mean() < 0.5:
        raise InputError(
            f"Only {int(common.sum())} of {len(selection)} selected spots of {selection_tsv} are in {counts_path}; "
            "the files probably belong to different sections."
        )
    selection = selection[common]
    estimated = pixel_size_um is None
    if estimated:
        pixel_size_um = estimate_pixel_size_um(selection, pitch_um)
    values = counts.loc[selection["id"].to_numpy()].to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(f"{counts_path} holds non-numeric values; expected integer counts.")
    matrix = sp.csr_matrix(values.astype(np.float32) if values.dtype.kind == "f" else values.astype(np.int64))
    xy_um = selection[["pixel_x", "pixel_y"]].to_numpy(dtype=float) * pixel_size_um
    slide_image = SlideImage(image, pixel_size_um=pixel_size_um)
    label = name or counts_path.name.split(".")[0]
    sample = Sample(
        name=label,
        genes=make_unique(counts.columns),
        image=slide_image,
        spots=SpotTable(
            counts=matrix, xy_um=xy_um, diameter_um=spot_diameter_um, pitch_um=pitch_um, ids=selection["id"].to_numpy()
        ),
        platform="legacy_st",
        meta={
            "pixel_size_um": float(pixel_size_um),
            "pixel_size_estimated": estimated,
            "array_xy": selection[["x", "y"]].to_numpy(),
            "counts_file": str(counts_path),
            "selection_file": str(selection_tsv),
        },
    )
    sample.check_registration()
    return sample


def find_legacy_st(folder: str | Path) -> dict[str, Path]:
    """Find the counts table, selection table and H&E image of one legacy ST section in ``folder``.

    Returns a dict with ``counts_tsv``, ``selection_tsv`` and ``image`` (pass as ``read_legacy_st(**found)``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Legacy ST folder not found: {folder}.")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    selections = [p for p in files if p.name.endswith(("_selection.tsv", "_selection.tsv.gz"))]
    counts = [p for p in files if p.name.endswith((".tsv", ".tsv.gz")) and p not in selections]
    images = [p for p in files if p.suffix.lower() in _IMAGE_SUFFIXES]
    problems = []
    for what, found in (("counts table (*.tsv / *.tsv.gz)", counts), ("selection table (*_selection.tsv)", selections),
                        ("H&E image (*.jpg / *.png / *.tif)", images)):
        if len(found) != 1:
            problems.append(f"{len(found)} {what}" + (f": {[p.name for p in found]}" if found else ""))
    if problems:
        raise InputError(
            f"Expected exactly one counts table, one selection table and one image in {folder}, found "
            + "; ".join(problems) + ". Pass the files to read_legacy_st explicitly."
        )
    return {"counts_tsv": counts[0], "selection_tsv": selections[0], "image": images[0]}
