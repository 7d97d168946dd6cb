"""Readers for spatial transcriptomics platforms.

Each returns a :class:`diffst.core.sample.Sample` (its image a :class:`diffst.core.image.SlideImage`).

``read_sample(path)`` detects the platform from a folder's contents:

* Xenium: ``transcripts.parquet`` / ``transcripts.csv.gz``;
* Visium / Visium HD (Space Ranger ``outs/``): ``filtered_feature_bc_matrix.h5``, ``spatial/`` or
  ``binned_outputs/``;
* legacy ST (HER2ST layout): ``*_selection.tsv`` with a counts ``*.tsv(.gz)`` and an H&E image;
* AnnData: an ``.h5ad`` file, with the image it carries in ``uns['spatial']`` (scanpy / squidpy Visium data,
  Diff-ST predictions) or one given as ``image=`` with ``pixel_size_um=``;
* SpatialData: a zarr store (a folder with ``.zgroup`` / ``zarr.json`` and ``images/``, ``points/``, ``shapes/``
  or ``tables/``, as spatialdata-io writes Xenium, Visium and Visium HD), or one element's folder in it
  (``STORE.zarr/tables/NAME``) to pick that element; read by :func:`read_spatialdata` (``spatial`` extra).
"""

from __future__ import annotations

from pathlib import Path

from diffst.errors import InputError
from diffst.io.anndata_reader import read_anndata
from diffst.io.legacy_st import find_legacy_st, read_legacy_st
from diffst.io.spatialdata_in import is_spatialdata_store, read_spatialdata, split_store_path
from diffst.io.visium import read_visium
from diffst.io.xenium import read_xenium

__all__ = [
    "detect_platform",
    "find_legacy_st",
    "is_spatialdata_store",
    "read_anndata",
    "read_legacy_st",
    "read_sample",
    "read_spatialdata",
    "read_visium",
    "read_xenium",
]


def detect_platform(path: str | Path) -> str:
    """Platform of a file or folder: "xenium", "visium", "legacy_st", "anndata" or "spatialdata"; raises when unknown."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Path not found: {path}.")
    if path.is_file():
        if path.suffix == ".h5ad":
            return "anndata"
        if path.name.startswith("transcripts.") and path.suffix in (".parquet", ".gz", ".csv"):
            return "xenium"
        raise InputError(f"Cannot tell the platform of file {path}; pass a folder, a transcripts file or an .h5ad.")
    try:
        split_store_path(path)
        return "spatialdata"
    except InputError:
        pass
    names = {p.name for p in path.iterdir()}
    if names & {"transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"}:
        return "xenium"
    outs = path / "outs" if "outs" in names and (path / "outs").is_dir() else path
    outs_names = {p.name for p in outs.iterdir()}
    if outs_names & {"filtered_feature_bc_matrix.h5", "binned_outputs"} or (
        "spatial" in outs_names and (outs / "spatial" / "scalefactors_json.json").exists()
    ):
        return "visium"
    if any(n.endswith(("_selection.tsv", "_selection.tsv.gz")) for n in names):
        return "legacy_st"
    h5ad = [n for n in names if n.endswith(".h5ad")]
    if len(h5ad) == 1:
        return "anndata"
    raise InputError(
        f"Cannot tell the platform of {path} (contents: {sorted(names)[:10]}). Expected a Xenium output folder "
        "(transcripts.parquet), a Space Ranger outs/ folder (filtered_feature_bc_matrix.h5 + spatial/), a legacy ST "
        "folder (<S>.tsv.gz, <S>_selection.tsv, H&E image), an .h5ad file or a SpatialData .zarr store (a folder "
        "with .zgroup or zarr.json and images/, points/, shapes/ or tables/); or call the platform's reader directly."
    )


def read_sample(path: str | Path, **kw):
    """Read a sample from ``path`` with the reader of the detected platform; ``kw`` go to that reader.

    Returns
    -------
    Sample
        What :func:`read_xenium`, :func:`read_visium`, :func:`read_legacy_st`, :func:`read_anndata` or
        :func:`read_spatialdata` returns.
    """
    path = Path(path)
    platform = detect_platform(path)
    if platform == "xenium":
        return read_xenium(path, **kw)
    if platform == "visium":
        return read_visium(path, **kw)
    if platform == "legacy_st":
        files = find_legacy_st(path)
        files.update({k: kw.pop(k) for k in list(kw) if k in files})
        return read_legacy_st(**files, **kw)
    if platform == "spatialdata":
        return read_spatialdata(path, **kw)
    if path.is_dir():
        path = next(p for p in path.iterdir() if p.name.endswith(".h5ad"))
    return read_anndata(path, **kw)
