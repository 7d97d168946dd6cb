"""10x Xenium output: transcripts table, morphology image, optional H&E with its alignment matrix."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffst.core.image import XENIUM_PIXEL_SIZE_UM, SlideImage, origin_xy, positive_number, tiff_pixel_size_um
from diffst.core.sample import Sample
from diffst.errors import GeometryError, InputError

log = logging.getLogger("diffst.io")

CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_Region",
    "antisense_",
)
_REQUIRED = ("feature_name", "x_location", "y_location")


def _find(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


def read_transcripts(path: str | Path, min_qv: float = 20.0, drop_controls: bool = True) -> pd.DataFrame:
    """Read a Xenium ``transcripts.csv.gz`` / ``transcripts.parquet``.

    Returns a DataFrame with ``feature_name`` (str), ``x_um``, ``y_um`` and, when present,
    ``overlaps_nucleus``, ``cell_id`` and ``qv``; rows below ``min_qv`` and (optionally) control
    probes are removed.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"Transcript file not found: {path}. Expected transcripts.csv.gz or transcripts.parquet.")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path)
    except Exception as exc:
        raise InputError(f"Cannot read transcripts from {path}: {exc}. The file may be truncated or corrupt.") from exc
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise InputError(
            f"{path} lacks the Xenium column(s) {missing}; found {list(table.columns)[:10]}. "
            "Is this a Xenium transcripts table?"
        )
    if table["feature_name"].dtype == object and len(table) and isinstance(table["feature_name"].iloc[0], bytes):
        table["feature_name"] = table["feature_name"].str.decode("utf-8")
    if len(table) == 0:
        raise InputError(f"{path} holds no transcripts (0 rows below the header). Is the file complete?")
    columns = {c: _numeric(table, c, path) for c in ("x_location", "y_location", "qv") if c in table.columns}
    bad = ~(np.isfinite(columns["x_location"]) & np.isfinite(columns["y_location"]))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise GeometryError(
            f"x_location / y_location of {path} are empty, NaN or infinite in {len(rows)} of {len(table)} rows "
            f"(e.g. data row {rows[0] + 1}); drop or fix those rows."
        )
    names = table["feature_name"]
    if names.isna().any():
        rows = np.flatnonzero(names.isna().to_numpy())
        raise InputError(
            f"{path}: {len(rows)} row(s) have an empty feature_name (e.g. data row {rows[0] + 1}); "
            "every transcript needs its gene name."
        )
    names = names.astype(str)
    keep = np.ones(len(table), dtype=bool)
    low_qv = np.zeros(len(table), dtype=bool)
    if "qv" in columns and min_qv is not None:
        low_qv = ~(columns["qv"] >= min_qv)  # NaN qv counts as low quality
        keep &= ~low_qv
    controls = names.str.startswith(CONTROL_PREFIXES).to_numpy() if drop_controls else np.zeros(len(table), bool)
    keep &= ~controls
    if not keep.any():
        raise InputError(
            f"No transcripts left in {path}: {len(table)} rows read, {int(low_qv.sum())} removed by qv < min_qv "
            f"({min_qv}), {int((controls & ~low_qv).sum())} more removed as control probes "
            f"({', '.join(p.rstrip('_') for p in CONTROL_PREFIXES[:3])}, ...). Lower the keyword min_qv of read_xenium "
            "(the diffst prepare command line has no option for it and uses 20) or keep controls with drop_controls=False."
        )
    out = pd.DataFrame(
        {"feature_name": names[keep].to_numpy(), "x_um": columns["x_location"][keep],
         "y_um": columns["y_location"][keep]}
    )
    for extra in ("overlaps_nucleus", "cell_id", "qv"):
        if extra in table.columns:
            out[extra] = columns[extra][keep] if extra in columns else table[extra].to_numpy()[keep]
    return out


def _numeric(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Read a column as float; raises naming the column, an example and the count of non-numeric entries."""
    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna() & table[column].notna()
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())
        raise InputError(
            f"Column '{column}' of {path} holds {len(rows)} non-numeric value(s) of {len(table)} rows, e.g. "
            f"{table[column].iloc[rows[0]]!r} in data row {rows[0] + 1}; expected numbers (microns for "
            "x_location / y_location). Fix or drop those rows."
        )
    return values.to_numpy(dtype=float)


def read_xenium(
    path: str | Path,
    *,
    image: str | Path | None = None,
    pixel_size_um: float | None = None,
    image_origin_um: Sequence[float] = (0.0, 0.0),
    he_image: str | Path | None = None,
    he_alignment: str | Path | np.ndarray | None = None,
    use_he: bool = False,
    min_qv: float = 20.0,
    drop_controls: bool = True,
    name: str | None = None,
    force_pixel_size: bool = False,
) -> Sample:
    """Read a Xenium output folder (or a transcripts file) into a :class:`Sample`.

    Parameters
    ----------
    path
        The Xenium ``outs`` folder, or a ``transcripts.csv.gz`` / ``.parquet`` file.
    image
        Morphology image (TIFF / OME-TIFF). Defaults to ``morphology_focus.ome.tif``,
        ``morphology_mip.ome.tif`` or ``morphology_mip.tif`` in the folder.
    pixel_size_um
        Microns per pixel of the morphology image; read from OME metadata when present, else
        Xenium's native 0.2125.
    image_origin_um
        Micron coordinates of the morphology image's top-left corner: (0, 0) for a full Xenium
        image, the crop corner for a cropped one.
    he_image, he_alignment
        An H&E image and Xenium's 3 x 3 alignment matrix (CSV or array) mapping H&E pixels to
        morphology-image pixels. With ``use_he=True`` the H&E becomes the sample's image.
    min_qv, drop_controls
        Transcript quality filter and removal of negative-control / blank codewords.
    name
        Sample name; defaults to the folder name.
    force_pixel_size
        Use ``pixel_size_um`` even when it disagrees with the image's OME metadata, and only warn when
        image and transcripts do not line up (:meth:`Sample.check_placement`).

    Returns
    -------
    Sample
        Point data (``transcripts``) with the morphology (or, with ``use_he``, the H&E) image.

    Raises
    ------
    GeometryError
        When ``pixel_size_um`` disagrees with the OME metadata, the transcripts miss the image, or the
        image intensity fits the transcripts clearly better at another pixel size or origin.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    tx_path = path if path.is_file() else _find(folder, ["transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"])
    if tx_path is None:
        raise InputError(f"No transcripts.parquet or transcripts.csv.gz in {folder}; point to a Xenium output folder.")
    table = read_transcripts(tx_path, min_qv=min_qv, drop_controls=drop_controls)
    codes, genes = pd.factorize(table["feature_name"], sort=True)
    transcripts = table.drop(columns="feature_name")
    transcripts.insert(0, "gene", codes.astype(np.int32))

    morphology = None
    if image is None:
        image = _find(folder, ["morphology_focus.ome.tif", "morphology_mip.ome.tif", "morphology.ome.tif", "morphology_mip.tif"])
        if image is None and (folder / "morphology_focus").is_dir():
            image = _find(folder / "morphology_focus", ["morphology_focus_0000.ome.tif"])
    if image is not None:
        is_tiff = Path(image).suffix.lower() in (".tif", ".tiff", ".btf") and Path(image).is_file()
        ome_px = tiff_pixel_size_um(image) if is_tiff else None  # a missing file is reported by SlideImage
        if pixel_size_um is None:
            # No OME size: Xenium's native one. A present but invalid one is rejected by SlideImage.
            morphology = SlideImage(image, XENIUM_PIXEL_SIZE_UM if ome_px is None else None, image_origin_um)
        elif ome_px and abs(positive_number(pixel_size_um, "pixel_size_um (--pixel-size)") / ome_px - 1) > 0.01:
            message = (
                f"pixel_size_um (--pixel-size) {float(pixel_size_um):g} disagrees with the OME metadata of {image}, "
                f"PhysicalSizeX = {ome_px:g} µm."
            )
            if not force_pixel_size:
                raise GeometryError(
                    f"{message} Omit --pixel-size to use the metadata; if the metadata is wrong, pass "
                    "force_pixel_size=True to read_xenium."
                )
            log.warning("%s Using %g µm/px as forced (force_pixel_size=True).", message, float(pixel_size_um))
        if morphology is None:
            morphology = SlideImage(image, pixel_size_um=pixel_size_um, origin_um=image_origin_um)
    chosen = morphology
    if he_image is not None:
        if he_alignment is None:
            raise InputError("An H&E image needs Xenium's alignment matrix (he_alignment, the *_imagealignment.csv file).")
        try:
            matrix = he_alignment if isinstance(he_alignment, np.ndarray) else np.loadtxt(he_alignment, delimiter=",")
            matrix = np.asarray(matrix, dtype=float)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"Cannot read the H&E alignment matrix {he_alignment} ({exc}); expected Xenium's *_imagealignment.csv "
                "(3 rows of 3 comma-separated numbers)."
            ) from exc
        if matrix.shape != (3, 3) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
            raise InputError(f"The H&E alignment matrix must be an invertible 3 x 3 matrix of numbers, got {matrix.tolist()}.")
        if morphology is not None:
            px, (ox, oy) = morphology.pixel_size_um, morphology.px_to_um[:2, 2]
        else:
            px = positive_number(XENIUM_PIXEL_SIZE_UM if pixel_size_um is None else pixel_size_um, "pixel_size_um (--pixel-size)")
            ox, oy = origin_xy(image_origin_um)
        # H&E pixel -> morphology pixel (matrix) -> microns; invert for microns -> H&E pixel.
        he_to_um = np.array([[px, 0, ox], [0, px, oy], [0, 0, 1]]) @ matrix
        um_to_he = np.linalg.inv(he_to_um)
        he_px_size = float(np.sqrt(abs(np.linalg.det(he_to_um[:2, :2]))))
        he = SlideImage(he_image, pixel_size_um=he_px_size, um_to_px=um_to_he)
        if use_he:
            chosen = he
    sample = Sample(
        name=name or folder.name,
        genes=list(genes),
        image=chosen,
        transcripts=transcripts,
        platform="xenium",
        meta={"transcripts_file": str(tx_path), "min_qv": min_qv},
    )
    sample.check_registration()
    sample.check_placement(strict=not force_pixel_size)
    return sample
