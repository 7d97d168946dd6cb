"""10x Xenium output: transcripts table, morphology image, optional H&E with its alignment matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffst.data.sample import Sample
from diffst.errors import InputError
from diffst.io.image import SlideImage, tiff_pixel_size_um

XENIUM_PIXEL_SIZE_UM = 0.2125
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
    keep = np.ones(len(table), dtype=bool)
    if "qv" in table.columns and min_qv is not None:
        keep &= table["qv"].to_numpy() >= min_qv
    names = table["feature_name"].astype(str)
    if drop_controls:
        keep &= ~names.str.startswith(CONTROL_PREFIXES).to_numpy()
    out = pd.DataFrame(
        {"feature_name": names[keep].to_numpy(), "x_um": table["x_location"].to_numpy(float)[keep],
         "y_um": table["y_location"].to_numpy(float)[keep]}
    )
    for extra in ("overlaps_nucleus", "cell_id", "qv"):
        if extra in table.columns:
            out[extra] = table[extra].to_numpy()[keep]
    return out


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
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    tx_path = path if path.is_file() else _find(folder, ["transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"])
    if tx_path is None:
        raise InputError(f"No transcripts.parquet or transcripts.csv.gz in {folder}; point to a Xenium output folder.")
    table = read_transcripts(tx_path, min_qv=min_qv, drop_controls=drop_controls)
    if len(table) == 0:
        raise InputError(f"No transcripts left in {tx_path} after filtering (min_qv={min_qv}); lower min_qv.")
    codes, genes = pd.factorize(table["feature_name"], sort=True)
    transcripts = table.drop(columns="feature_name")
    transcripts.insert(0, "gene", codes.astype(np.int32))

    morphology = None
    if image is None:
        image = _find(folder, ["morphology_focus.ome.tif", "morphology_mip.ome.tif", "morphology.ome.tif", "morphology_mip.tif"])
        if image is None and (folder / "morphology_focus").is_dir():
            image = _find(folder / "morphology_focus", ["morphology_focus_0000.ome.tif"])
    if image is not None:
        if pixel_size_um is None:
            pixel_size_um = tiff_pixel_size_um(image) or XENIUM_PIXEL_SIZE_UM
        morphology = SlideImage(image, pixel_size_um=pixel_size_um, origin_um=image_origin_um)
    chosen = morphology
    if he_image is not None:
        if he_alignment is None:
            raise InputError("An H&E image needs Xenium's alignment matrix (he_alignment, the *_imagealignment.csv file).")
        matrix = np.loadtxt(he_alignment, delimiter=",") if not isinstance(he_alignment, np.ndarray) else he_alignment
        if matrix.shape != (3, 3):
            raise InputError(f"The H&E alignment matrix must be 3 x 3, got {matrix.shape}.")
        px = pixel_size_um or (morphology.pixel_size_um if morphology else XENIUM_PIXEL_SIZE_UM)
        ox, oy = image_origin_um
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
    return sample
