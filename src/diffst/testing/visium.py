"""Write Space Ranger-style ``outs/`` folders (Visium, Visium HD) for tests of :func:`diffst.io.read_visium`.

Test support only: the package never writes Visium data itself. The layout follows what Space Ranger
writes (``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions*.{csv,parquet}``,
``scalefactors_json.json``, ``tissue_{hires,lowres}_image.png``); see :mod:`diffst.io.visium` for the
frame conventions the reader applies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diffst.core.image import SlideImage
from diffst.core.sample import Sample
from diffst.errors import GeometryError, InputError
from diffst.io.visium import GENE_EXPRESSION, VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM


def write_10x_h5(
    path: str | Path,
    counts,
    barcodes: Sequence[str],
    genes: Sequence[str],
    gene_ids: Sequence[str] | None = None,
    genome: str = "unknown",
    library_id: str = "sample",
) -> Path:
    """Write a 10x feature-barcode HDF5 matrix (the Cell Ranger >= 3 / Space Ranger layout).

    ``counts`` is (barcodes x genes); it is stored as 10x does, features x barcodes in CSC arrays
    under ``/matrix`` with ``features/{id,name,feature_type,genome,_all_tag_keys}``.

    Parameters
    ----------
    path
        The ``.h5`` file to write.
    counts
        Raw non-negative integer counts, (barcodes x genes), dense or sparse.
    barcodes, genes
        Row and column names.
    gene_ids
        Feature ids (Ensembl ids in real data); defaults to the gene names.
    genome, library_id
        Written to ``features/genome`` and the file's ``library_ids`` attribute.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        When the names do not match the shape of ``counts`` or the counts are not non-negative integers.
    """
    import h5py

    path = Path(path)
    matrix = sp.csr_matrix(counts)
    n_bc, n_ft = matrix.shape
    if len(barcodes) != n_bc or len(genes) != n_ft:
        raise InputError(
            f"Counts are {matrix.shape} (barcodes x genes) but {len(barcodes)} barcodes and {len(genes)} genes were given."
        )
    data = matrix.data
    if data.size and (np.any(data < 0) or np.any(data != np.round(data))):
        raise InputError("A 10x matrix holds raw non-negative integer counts; the counts given are not.")
    matrix.sum_duplicates()
    matrix.sort_indices()
    ids = list(gene_ids) if gene_ids is not None else [str(g) for g in genes]

    def fixed(values):
        return np.array([str(v).encode("utf-8") for v in values], dtype="S")

    with h5py.File(path, "w") as fh:
        fh.attrs["filetype"] = "matrix"
        fh.attrs["version"] = 2
        fh.attrs["library_ids"] = fixed([library_id])
        fh.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        fh.attrs["chemistry_description"] = "Visium Spatial Gene Expression"
        fh.attrs["software_version"] = "diffst write_visium"
        group = fh.create_group("matrix")
        # CSR of barcodes x genes == CSC of genes x barcodes, which is the 10x layout.
        group.create_dataset("data", data=matrix.data.astype(np.int32), compression="gzip")
        group.create_dataset("indices", data=matrix.indices.astype(np.int64), compression="gzip")
        group.create_dataset("indptr", data=matrix.indptr.astype(np.int64), compression="gzip")
        group.create_dataset("shape", data=np.array([n_ft, n_bc], dtype=np.int32))
        group.create_dataset("barcodes", data=fixed(barcodes))
        feats = group.create_group("features")
        feats.create_dataset("id", data=fixed(ids))
        feats.create_dataset("name", data=fixed(genes))
        feats.create_dataset("feature_type", data=fixed([GENE_EXPRESSION] * n_ft))
        feats.create_dataset("genome", data=fixed([genome] * n_ft))
        feats.create_dataset("_all_tag_keys", data=fixed(["genome"]))
    return path


def _image_to_uint8(image: SlideImage) -> np.ndarray:
    """Return the full-resolution pixels of ``image`` as uint8 (rows, cols, 3)."""
    rows, cols = image.shape_px
    arr = image.read_px(0, 0, rows, cols)
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float32) / image.intensity_max().astype(np.float32) * 255.0, 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] != 3:
        arr = np.ascontiguousarray(arr[..., :3]) if arr.shape[2] > 3 else np.concatenate([arr, arr[..., :1]], axis=2)
    return arr


def _bin_transcripts(sample: Sample, bin_um: float):
    """Bin the sample's transcripts into squares: counts CSR, centre microns, barcodes, array row/col."""
    tx = sample.transcripts
    col = np.floor(tx["x_um"].to_numpy() / bin_um).astype(np.int64)
    row = np.floor(tx["y_um"].to_numpy() / bin_um).astype(np.int64)
    key = row * (col.max() + 1) + col
    uniq, inverse = np.unique(key, return_inverse=True)
    counts = sp.csr_matrix(
        (np.ones(len(tx), dtype=np.int32), (inverse, tx["gene"].to_numpy())), shape=(len(uniq), len(sample.genes))
    )
    counts.sum_duplicates()
    ncol = col.max() + 1
    brow, bcol = uniq // ncol, uniq % ncol
    xy = np.column_stack([(bcol + 0.5) * bin_um, (brow + 0.5) * bin_um])
    size = int(round(bin_um))
    barcodes = np.array([f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(brow, bcol, strict=True)])
    return counts, xy, barcodes, brow, bcol


def write_visium(
    sample_or_arrays: Sample | Mapping,
    outs_dir: str | Path,
    *,
    fullres_um_per_px: float | None = None,
    bin_size_um: float | None = None,
    positions_format: str = "csv",
    hires_max_px: int = 2000,
    lowres_max_px: int = 600,
    write_fullres: bool = False,
    library_id: str | None = None,
) -> dict:
    """Write a Space Ranger-style ``outs/`` folder (Visium, or Visium HD with ``bin_size_um``).

    Parameters
    ----------
    sample_or_arrays
        A spot :class:`Sample` with an image whose pixel grid starts at micron (0, 0), a point
        Sample (binned into squares of ``bin_size_um``), or a mapping with ``counts`` (spots x
        genes), ``genes``, ``xy_um``, optional ``ids``, ``image`` (array) and ``pixel_size_um``.
    outs_dir
        Folder to create. Visium: ``outs_dir/filtered_feature_bc_matrix.h5`` and ``outs_dir/spatial/``;
        Visium HD: the same inside ``outs_dir/binned_outputs/square_XXXum/``.
    fullres_um_per_px
        Microns per full-resolution pixel; defaults to the image's pixel size (the full-resolution
        frame is then the image's own pixel grid).
    bin_size_um
        Write Visium HD: square bins of this size, positions as parquet, ``bin_size_um`` and
        ``microns_per_pixel`` in the scale factors.
    positions_format
        Visium only: "csv" (``tissue_positions.csv`` with header, Space Ranger >= 2), "list"
        (``tissue_positions_list.csv``, no header, Space Ranger 1.x) or "parquet".
    hires_max_px, lowres_max_px
        Longest side of ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` (Space Ranger: 2000 / 600).
    write_fullres
        Also write the full-resolution image as ``outs_dir/fullres_image.tif`` (Space Ranger itself does
        not copy it into ``outs/``; pass it to :func:`read_visium` as ``fullres_image``).

    Returns
    -------
    dict
        Paths written (``matrix``, ``positions``, ``scalefactors``, ``hires``, ``lowres``, ``fullres``),
        ``folder`` (what :func:`read_visium` reads) and ``scalefactors_values`` (the dict written).
    """
    from PIL import Image

    outs_dir = Path(outs_dir)
    hd = bin_size_um is not None
    gene_ids = None
    array_row = array_col = None
    if isinstance(sample_or_arrays, Sample):
        sample = sample_or_arrays
        genes = list(sample.genes)
        gene_ids = sample.meta.get("gene_ids") if len(sample.meta.get("gene_ids", [])) == len(genes) else None
        image = sample.image
        if sample.spots is not None:
            counts, xy_um, ids = sample.spots.counts, sample.spots.xy_um, np.asarray(sample.spots.ids).astype(str)
        else:
            if not hd:
                raise InputError(
                    f"Sample {sample.name} holds transcripts, not spots; pass bin_size_um= to write them as Visium HD bins."
                )
            counts, xy_um, ids, array_row, array_col = _bin_transcripts(sample, float(bin_size_um))
        library_id = library_id or sample.name
    else:
        missing = [k for k in ("counts", "genes", "xy_um") if k not in sample_or_arrays]
        if missing:
            raise InputError(f"write_visium needs counts, genes and xy_um; the mapping lacks {missing}.")
        counts = sp.csr_matrix(sample_or_arrays["counts"])
        genes = [str(g) for g in sample_or_arrays["genes"]]
        xy_um = np.asarray(sample_or_arrays["xy_um"], dtype=float)
        ids = np.asarray(sample_or_arrays.get("ids", [f"SPOT{i:06d}-1" for i in range(counts.shape[0])])).astype(str)
        image = None
        if sample_or_arrays.get("image") is not None:
            image = SlideImage(np.asarray(sample_or_arrays["image"]), pixel_size_um=sample_or_arrays.get("pixel_size_um"))
        library_id = library_id or "sample"
    counts = sp.csr_matrix(counts)
    if xy_um.shape != (counts.shape[0], 2) or len(ids) != counts.shape[0]:
        raise InputError(
            f"{counts.shape[0]} spots in counts but coordinates {xy_um.shape} and {len(ids)} ids; they must agree."
        )
    if image is not None:
        pxs = image.um_to_px
        aligned = abs(pxs[0, 1]) < 1e-12 and abs(pxs[1, 0]) < 1e-12 and abs(pxs[0, 2]) < 1e-9 and abs(pxs[1, 2]) < 1e-9
        if not aligned:
            raise GeometryError(
                "write_visium needs an image whose pixel (0, 0) sits at micron (0, 0) with no rotation "
                f"(um_to_px = {pxs.tolist()}); resample the image into that frame first."
            )
        fullres_um_per_px = fullres_um_per_px or image.pixel_size_um
    if fullres_um_per_px is None:
        raise InputError("Without an image, give fullres_um_per_px (microns per full-resolution pixel).")
    f = float(fullres_um_per_px)

    folder = outs_dir / "binned_outputs" / f"square_{int(round(bin_size_um)):03d}um" if hd else outs_dir
    spatial = folder / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    written: dict = {"folder": folder}
    written["matrix"] = write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, ids, genes, gene_ids, library_id=library_id)

    px = xy_um / f
    if array_row is None:
        pitch = float(bin_size_um) if hd else (sample_or_arrays.spots.pitch_um if isinstance(sample_or_arrays, Sample) and sample_or_arrays.spots is not None and sample_or_arrays.spots.pitch_um else VISIUM_PITCH_UM)
        array_col = np.round((xy_um[:, 0] - xy_um[:, 0].min()) / pitch).astype(np.int64)
        array_row = np.round((xy_um[:, 1] - xy_um[:, 1].min()) / pitch).astype(np.int64)
    positions = pd.DataFrame(
        {"barcode": ids, "in_tissue": np.ones(len(ids), dtype=np.int64), "array_row": array_row,
         "array_col": array_col, "pxl_row_in_fullres": px[:, 1], "pxl_col_in_fullres": px[:, 0]}
    )
    fmt = "parquet" if hd else positions_format
    if fmt == "parquet":
        written["positions"] = spatial / "tissue_positions.parquet"
        positions.to_parquet(written["positions"], index=False)
    elif fmt == "csv":
        written["positions"] = spatial / "tissue_positions.csv"
        positions.to_csv(written["positions"], index=False, float_format="%.17g")
    elif fmt == "list":
        written["positions"] = spatial / "tissue_positions_list.csv"
        positions.to_csv(written["positions"], index=False, header=False, float_format="%.17g")
    else:
        raise InputError(f"positions_format={positions_format!r}; expected 'csv', 'list' or 'parquet'.")

    if isinstance(sample_or_arrays, Sample) and sample_or_arrays.spots is not None:
        diameter_um = sample_or_arrays.spots.diameter_um or VISIUM_SPOT_DIAMETER_UM
    else:
        diameter_um = float(bin_size_um) if hd else VISIUM_SPOT_DIAMETER_UM
    factors = {"spot_diameter_fullres": diameter_um / f, "fiducial_diameter_fullres": diameter_um / f * 65.0 / 55.0}
    if image is not None:
        full = _image_to_uint8(image)
        rows, cols = full.shape[:2]
        pil = Image.fromarray(full)
        for kind, max_px in (("hires", hires_max_px), ("lowres", lowres_max_px)):
            scalef = min(1.0, max_px / max(rows, cols))
            size = (max(1, int(round(cols * scalef))), max(1, int(round(rows * scalef))))
            out = spatial / f"tissue_{kind}_image.png"
            pil.resize(size, Image.Resampling.LANCZOS if scalef < 1 else Image.Resampling.NEAREST).save(out)
            factors[f"tissue_{kind}_scalef"] = scalef
            written[kind] = out
        if write_fullres:
            import tifffile

            written["fullres"] = outs_dir / "fullres_image.tif"
            tifffile.imwrite(written["fullres"], full, photometric="rgb", tile=(256, 256), compression="zlib")
    else:
        factors["tissue_hires_scalef"] = 1.0
        factors["tissue_lowres_scalef"] = 1.0
    if hd:
        factors["bin_size_um"] = float(bin_size_um)
        factors["microns_per_pixel"] = f
        factors["regist_target_img_scalef"] = factors["tissue_hires_scalef"]
    written["scalefactors"] = spatial / "scalefactors_json.json"
    written["scalefactors"].write_text(json.dumps(factors, indent=4))
    written["scalefactors_values"] = factors
    return written
