"""10x Visium and Visium HD Space Ranger output (``outs/``): counts, spot positions, scale factors, images.

Frame. Space Ranger gives spot centres in pixels of the full-resolution image the user supplied
(``pxl_col_in_fullres``, ``pxl_row_in_fullres``). Diff-ST places them in microns:
``x_um = pxl_col_in_fullres * um_per_fullres_px`` (same for y), with the image origin at (0, 0). The
micron size of a full-resolution pixel is

* Visium: ``55 / spot_diameter_fullres`` (a Visium spot is 55 µm across, on a 100 µm pitch);
* Visium HD: ``microns_per_pixel`` from the scale factors when present, else
  ``bin_size_um / spot_diameter_fullres`` (bins are squares; pitch = bin size).

The images shipped in ``spatial/`` are downscaled copies of the full-resolution image:
``tissue_hires_image.png`` has ``um_per_fullres_px / tissue_hires_scalef`` microns per pixel, and
``tissue_lowres_image.png`` the same with ``tissue_lowres_scalef``. Reading a hires image with the
full-resolution pixel size (or the reverse) is the most common registration mistake in the field;
:func:`read_visium` checks the placement and says which scale factor to use.

Duplicate gene symbols (10x matrices hold a few symbols with several Ensembl ids) are made unique
the way scanpy/anndata do it (``TBCE``, ``TBCE-1``, ...), so no count is merged or lost; the Ensembl ids
are kept in ``Sample.meta['gene_ids']``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diffst.core.image import SlideImage
from diffst.core.sample import Sample, SpotTable
from diffst.errors import GeometryError, InputError

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_PITCH_UM = 100.0
GENE_EXPRESSION = "Gene Expression"
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
_MATRIX_NAMES = ("filtered_feature_bc_matrix.h5",)
_POSITION_NAMES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_LAYOUT_HELP = (
    "Expected a Space Ranger outs/ folder: Visium (Space Ranger >= 1.0) holds filtered_feature_bc_matrix.h5 and "
    "spatial/{tissue_positions.csv (>= 2.0) or tissue_positions_list.csv (1.x), scalefactors_json.json, "
    "tissue_hires_image.png}; Visium HD (Space Ranger >= 3.0) holds the same inside "
    "binned_outputs/square_008um/ with spatial/tissue_positions.parquet."
)


# ---------------------------------------------------------------------------------------------- helpers
def make_unique(names: Sequence[str]) -> list[str]:
    """Make names unique by appending ``-1``, ``-2``, ... to repeats (the anndata convention)."""
    names = [str(n) for n in names]
    taken = set(names)
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n not in seen:
            seen[n] = 0
            out.append(n)
            continue
        k = seen[n]
        while True:
            k += 1
            candidate = f"{n}-{k}"
            if candidate not in taken:
                break
        seen[n] = k
        taken.add(candidate)
        out.append(candidate)
    return out


def _decode(values: np.ndarray) -> np.ndarray:
    """Fixed-length byte strings from HDF5 -> Python str array."""
    values = np.asarray(values)
    if values.dtype.kind == "S":
        return values.astype(str)
    if values.dtype.kind == "O":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object).astype(str)
    return values.astype(str)


def read_10x_h5(path: str | Path, feature_type: str | None = GENE_EXPRESSION) -> dict:
    """Read a 10x feature-barcode matrix HDF5 file (Cell Ranger / Space Ranger >= 3 layout).

    Parameters
    ----------
    path
        ``filtered_feature_bc_matrix.h5`` (or ``raw_feature_bc_matrix.h5``).
    feature_type
        Keep only features of this type ("Gene Expression"); None keeps all.

    Returns
    -------
    dict
        ``counts``: CSR (n_barcodes, n_features) int32 counts; ``barcodes``: str array;
        ``genes``: feature names (gene symbols, not yet made unique); ``gene_ids``: feature ids;
        ``feature_types``: feature types of the kept features.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"Count matrix not found: {path}. {_LAYOUT_HELP}")
    try:
        handle = h5py.File(path, "r")
    except Exception as exc:
        raise InputError(
            f"Cannot open {path} as HDF5 ({exc}): the file is corrupt, truncated or not a 10x .h5 matrix. "
            "Re-copy it from the Space Ranger outs/ folder."
        ) from exc
    with handle:
        if "matrix" not in handle:
            raise InputError(
                f"{path} has no /matrix group (found {sorted(handle.keys())[:5]}): it is not a 10x feature-barcode "
                "matrix in the Cell Ranger >= 3 / Space Ranger layout (the older per-genome v2 layout is not supported; "
                "re-run Space Ranger or convert it)."
            )
        group = handle["matrix"]
        needed = ["data", "indices", "indptr", "shape", "barcodes", "features/name", "features/id"]
        missing = [k for k in needed if k not in group]
        if missing:
            raise InputError(f"{path}: /matrix lacks {missing}; the 10x HDF5 file is incomplete or corrupt.")
        try:
            shape = tuple(int(v) for v in group["shape"][()])
            data = group["data"][()]
            indices = group["indices"][()]
            indptr = group["indptr"][()]
            barcodes = _decode(group["barcodes"][()])
            names = _decode(group["features/name"][()])
            ids = _decode(group["features/id"][()])
            if "features/feature_type" in group:
                types = _decode(group["features/feature_type"][()])
            else:
                types = np.full(len(names), GENE_EXPRESSION)
        except Exception as exc:
            raise InputError(f"Cannot read the datasets of {path} ({exc}); the 10x HDF5 file is corrupt.") from exc
    n_features, n_barcodes = shape
    if len(barcodes) != n_barcodes or len(names) != n_features or len(indptr) != n_barcodes + 1:
        raise InputError(
            f"{path}: /matrix/shape is {shape} (features x barcodes) but there are {len(names)} features, "
            f"{len(barcodes)} barcodes and {len(indptr) - 1} columns; the 10x HDF5 file is inconsistent."
        )
    try:
        # 10x stores features x barcodes in CSC: the CSR of the transpose is barcodes x features.
        counts = sp.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_features))
    except Exception as exc:
        raise InputError(f"{path}: the sparse matrix arrays do not fit together ({exc}); the file is corrupt.") from exc
    if feature_type is not None:
        keep = types == feature_type
        if not keep.any():
            raise InputError(
                f"{path} holds no '{feature_type}' features (types found: {sorted(set(types))}); "
                "pass the gene-expression matrix."
            )
        counts = counts[:, np.flatnonzero(keep)]
        names, ids, types = names[keep], ids[keep], types[keep]
    return {"counts": counts.tocsr(), "barcodes": barcodes, "genes": names, "gene_ids": ids, "feature_types": types}


def read_tissue_positions(path: str | Path) -> pd.DataFrame:
    """Read ``tissue_positions.csv`` (header), ``tissue_positions_list.csv`` (no header) or ``.parquet``.

    Returns a DataFrame with the six Space Ranger columns ``barcode, in_tissue, array_row, array_col,
    pxl_row_in_fullres, pxl_col_in_fullres``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"Spot positions not found: {path}. {_LAYOUT_HELP}")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            with open(path) as fh:
                first = fh.readline()
            has_header = first.split(",")[0].strip().lower() == "barcode"
            table = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                if table.shape[1] != 6:
                    raise InputError(
                        f"{path} has {table.shape[1]} columns and no header; expected the 6 Space Ranger columns "
                        f"{list(POSITION_COLUMNS)}."
                    )
                table.columns = list(POSITION_COLUMNS)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Cannot read spot positions from {path} ({exc}); the file is corrupt or not a table.") from exc
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"{path} lacks the column(s) {missing} (found {list(table.columns)[:8]}); expected {list(POSITION_COLUMNS)}."
        )
    table = table[list(POSITION_COLUMNS)].copy()
    table["barcode"] = _decode(table["barcode"].to_numpy())
    return table


def read_scalefactors(path: str | Path) -> dict:
    """Read ``scalefactors_json.json``; checks that ``spot_diameter_fullres`` is a positive number."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Scale factors not found: {path}. {_LAYOUT_HELP}")
    try:
        factors = json.loads(path.read_text())
    except Exception as exc:
        raise InputError(f"Cannot parse {path} as JSON ({exc}); the scale-factor file is corrupt.") from exc
    for key in ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef"):
        value = factors.get(key)
        if value is not None and (not np.isfinite(float(value)) or float(value) <= 0):
            raise GeometryError(f"{path}: {key} = {value!r}; expected a positive number.")
    if "spot_diameter_fullres" not in factors and "microns_per_pixel" not in factors:
        raise InputError(
            f"{path} has neither spot_diameter_fullres nor microns_per_pixel (keys: {sorted(factors)}); "
            "the pixel size of the full-resolution image cannot be derived."
        )
    return factors


def _resolve_folder(outs_dir: Path, bin_size_um: int) -> tuple[Path, bool]:
    """Find the folder holding the matrix and spatial/ (the HD bin folder for Visium HD), and whether it is HD."""
    if not outs_dir.exists():
        raise InputError(f"Space Ranger folder not found: {outs_dir}. {_LAYOUT_HELP}")
    if not outs_dir.is_dir():
        raise InputError(f"{outs_dir} is a file; pass the Space Ranger outs/ folder. {_LAYOUT_HELP}")
    if (outs_dir / "outs").is_dir() and not (outs_dir / "spatial").exists():
        outs_dir = outs_dir / "outs"
    binned = outs_dir / "binned_outputs"
    if binned.is_dir() and not (outs_dir / "filtered_feature_bc_matrix.h5").exists():
        folder = binned / f"square_{int(bin_size_um):03d}um"
        if not folder.is_dir():
            found = sorted(p.name for p in binned.iterdir() if p.is_dir())
            raise InputError(
                f"Visium HD folder {binned} has no {folder.name}/ (found {found}); pass bin_size_um= one of those sizes."
            )
        return folder, True
    return outs_dir, outs_dir.name.startswith("square_")


def _find_first(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


# ---------------------------------------------------------------------------------------------- reader
def read_visium(
    outs_dir: str | Path,
    *,
    image: str | Path = "auto",
    fullres_image: str | Path | None = None,
    library_id: str | None = None,
    name: str | None = None,
    bin_size_um: int = 8,
    spot_diameter_um: float | None = None,
    pitch_um: float | None = None,
) -> Sample:
    """Read a Visium or Visium HD Space Ranger ``outs/`` folder into a :class:`Sample`.

    Parameters
    ----------
    outs_dir
        The ``outs/`` folder (or its parent), or for Visium HD either ``outs/`` or one
        ``binned_outputs/square_XXXum/`` folder.
    image
        Which image becomes ``Sample.image``: ``"auto"`` (the full-resolution image when
        ``fullres_image`` is given, else ``spatial/tissue_hires_image.png``, else the lowres image),
        ``"fullres"`` (requires ``fullres_image``), ``"hires"``, ``"lowres"``, or a path to an image
        that is in the full-resolution pixel frame.
    fullres_image
        The full-resolution image given to Space Ranger (TIFF / JPEG); Space Ranger does not copy it
        into ``outs/``.
    library_id
        Library id recorded in ``meta`` (the ``uns['spatial']`` key for AnnData export); defaults
        to the sample name.
    name
        Sample name; defaults to ``library_id`` or the folder name above ``outs/``.
    bin_size_um
        Visium HD only: which ``square_XXXum`` bin folder to read from an ``outs/`` folder.
    spot_diameter_um, pitch_um
        Override the platform's spot diameter and pitch (Visium 55 / 100 µm; HD bin size / bin size),
        for arrays of other geometry written in the Visium layout. The micron size of a
        full-resolution pixel is ``spot_diameter_um / spot_diameter_fullres`` (unless the scale
        factors give ``microns_per_pixel``).

    Returns
    -------
    Sample
        ``platform`` "visium" or "visium_hd"; ``spots``: in-tissue spots only, counts CSR
        (spots x genes, "Gene Expression" features, symbols made unique), ``xy_um`` = full-res pixel
        (col, row) x µm/px, ``ids`` = barcodes; ``image``: the chosen :class:`SlideImage` placed in
        the same micron frame; ``meta``: ``library_id``, ``scalefactors``, ``um_per_fullres_px``,
        ``gene_ids``, ``array_row``, ``array_col``, ``image_kind``, file paths.

    Raises
    ------
    InputError
        Missing or corrupt files, barcodes in the positions table missing from the matrix.
    GeometryError
        Spots that do not lie on the chosen image, or spot spacing that disagrees with the pitch
        (wrong scale factor / wrong image).
    """
    folder, hd = _resolve_folder(Path(outs_dir), bin_size_um)
    matrix_path = _find_first(folder, _MATRIX_NAMES)
    if matrix_path is None:
        raise InputError(f"No filtered_feature_bc_matrix.h5 in {folder}. {_LAYOUT_HELP}")
    spatial = folder / "spatial"
    positions_path = _find_first(spatial, _POSITION_NAMES)
    if positions_path is None:
        raise InputError(
            f"No tissue_positions.parquet / tissue_positions.csv / tissue_positions_list.csv in {spatial}. {_LAYOUT_HELP}"
        )
    factors = read_scalefactors(spatial / "scalefactors_json.json")
    hd = hd or "bin_size_um" in factors

    matrix = read_10x_h5(matrix_path)
    positions = read_tissue_positions(positions_path)
    positions = positions[positions["in_tissue"].astype(int) == 1]
    if len(positions) == 0:
        raise InputError(f"{positions_path} marks no spot as in_tissue = 1; nothing to read.")
    if positions["barcode"].duplicated().any():
        dup = positions.loc[positions["barcode"].duplicated(), "barcode"].iloc[:3].tolist()
        raise InputError(f"{positions_path} lists barcodes more than once (e.g. {dup}); the table is corrupt.")
    row_of = pd.Series(np.arange(len(matrix["barcodes"])), index=matrix["barcodes"])
    if row_of.index.duplicated().any():
        raise InputError(f"{matrix_path} lists barcodes more than once; the matrix is corrupt.")
    rows = row_of.reindex(positions["barcode"].to_numpy())
    absent = rows.isna().to_numpy()
    if absent.any():
        examples = positions["barcode"].to_numpy()[absent][:3].tolist()
        raise InputError(
            f"{int(absent.sum())} of {len(positions)} in-tissue barcodes of {positions_path.name} (e.g. {examples}) are "
            f"not in {matrix_path.name} ({len(row_of)} barcodes): the positions and the matrix come from different "
            "Space Ranger runs or samples. Use the files of one outs/ folder."
        )
    counts = matrix["counts"][rows.to_numpy(dtype=np.int64)]

    # Micron size of a full-resolution pixel.
    if hd:
        bin_um = float(factors.get("bin_size_um", bin_size_um))
        diameter = float(spot_diameter_um) if spot_diameter_um is not None else bin_um
        pitch = float(pitch_um) if pitch_um is not None else bin_um
        if "microns_per_pixel" in factors and spot_diameter_um is None:
            um_per_px = float(factors["microns_per_pixel"])
        else:
            um_per_px = diameter / float(factors["spot_diameter_fullres"])
    else:
        diameter = float(spot_diameter_um) if spot_diameter_um is not None else VISIUM_SPOT_DIAMETER_UM
        pitch = float(pitch_um) if pitch_um is not None else VISIUM_PITCH_UM
        if "spot_diameter_fullres" not in factors:
            um_per_px = float(factors["microns_per_pixel"])
        else:
            um_per_px = diameter / float(factors["spot_diameter_fullres"])
    if not np.isfinite(um_per_px) or um_per_px <= 0:
        raise GeometryError(f"Derived {um_per_px} µm per full-resolution pixel from {factors}; expected a positive number.")
    px = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float)
    if not np.all(np.isfinite(px)):
        raise GeometryError(f"{positions_path} has NaN pixel coordinates for some in-tissue spots; the table is corrupt.")
    xy_um = px * um_per_px

    slide_image, image_kind = _choose_image(image, fullres_image, spatial, factors, um_per_px)
    label = name or library_id or (folder.parent.name if folder.name == "outs" else folder.name)
    spots = SpotTable(
        counts=counts, xy_um=xy_um, diameter_um=diameter, pitch_um=pitch, ids=positions["barcode"].to_numpy()
    )
    sample = Sample(
        name=str(label),
        genes=make_unique(matrix["genes"]),
        image=slide_image,
        spots=spots,
        platform="visium_hd" if hd else "visium",
        meta={
            "library_id": str(library_id or label),
            "scalefactors": factors,
            "um_per_fullres_px": um_per_px,
            "gene_ids": list(matrix["gene_ids"]),
            "array_row": positions["array_row"].to_numpy(),
            "array_col": positions["array_col"].to_numpy(),
            "image_kind": image_kind,
            "matrix_file": str(matrix_path),
            "positions_file": str(positions_path),
            "scalefactors_file": str(spatial / "scalefactors_json.json"),  # places spots and image: hashed too
        },
    )
    try:
        sample.check_registration()
    except GeometryError as exc:
        raise GeometryError(f"{exc} {_scale_hint(sample, image_kind, factors, px)}") from exc
    return sample


def _choose_image(image, fullres_image, spatial: Path, factors: Mapping, um_per_px: float):
    """Open the SlideImage selected by ``image``, in the micron frame of the full-resolution pixels."""
    kind = str(image) if isinstance(image, str) else "path"
    if kind == "auto":
        if fullres_image is not None:
            kind = "fullres"
        elif (spatial / "tissue_hires_image.png").exists():
            kind = "hires"
        elif (spatial / "tissue_lowres_image.png").exists():
            kind = "lowres"
        else:
            return None, None
    if kind == "fullres":
        if fullres_image is None:
            raise InputError(
                "image='fullres' needs fullres_image= (the image given to Space Ranger; it is not copied into outs/). "
                "Or use image='hires'."
            )
        return SlideImage(fullres_image, pixel_size_um=um_per_px), "fullres"
    if kind in ("hires", "lowres"):
        path = spatial / f"tissue_{kind}_image.png"
        if not path.exists():
            raise InputError(f"image='{kind}' but {path} does not exist. {_LAYOUT_HELP}")
        key = f"tissue_{kind}_scalef"
        if key not in factors:
            raise InputError(f"{spatial / 'scalefactors_json.json'} lacks {key}, needed to place the {kind} image.")
        return SlideImage(path, pixel_size_um=um_per_px / float(factors[key])), kind
    if kind == "path" or Path(str(image)).suffix:
        return SlideImage(image, pixel_size_um=um_per_px), "fullres"
    raise InputError(f"image={image!r}; expected 'auto', 'fullres', 'hires', 'lowres' or a path to an image file.")


def _scale_hint(sample: Sample, kind: str | None, factors: Mapping, px: np.ndarray) -> str:
    """Explain a registration failure in terms of Space Ranger's scale factors."""
    if sample.image is None:
        return ""
    rows, cols = sample.image.shape_px
    need = float(px.max(axis=0).max())  # full-res pixels the image must span
    implied = max(rows, cols) / max(need, 1.0)
    hints = []
    for key in ("tissue_hires_scalef", "tissue_lowres_scalef"):
        s = factors.get(key)
        if s and kind == "fullres" and implied < 1.5 * float(s):
            hints.append(
                f"The image is {cols} x {rows} px, about {key} ({float(s):g}) times the full-resolution frame: "
                f"it looks like the {key.split('_')[1]} image; pass image='{key.split('_')[1]}' instead of using it as full resolution."
            )
    if not hints:
        hints.append(
            f"The {kind or 'given'} image is {cols} x {rows} px; the spots reach full-resolution pixel {need:.0f}. "
            "Check that the image matches the scale factor used (fullres: 1, hires: tissue_hires_scalef, "
            "lowres: tissue_lowres_scalef) and that spot_diameter_fullres is right."
        )
    return " ".join(hints)
