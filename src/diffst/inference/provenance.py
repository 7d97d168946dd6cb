"""What a prediction was made from: checkpoint, sampler, seed, software and input files with their hashes.

The record is a nested dict of strings, numbers and lists only, so that it is written as it is into
AnnData ``uns`` (both ``.h5ad`` and zarr). File lists are stored as parallel columns (``path``,
``size_bytes``, ``sha256``) because AnnData cannot store a list of dicts, and file names with a ``/``
cannot be keys of an HDF5 group.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import diffst


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (a large file is never held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(paths: Iterable[str | Path]) -> dict[str, list]:
    """Paths, sizes and sha256 of files, as parallel lists; a file that is missing gets size -1 and no hash.

    Returns
    -------
    dict
        ``path`` (absolute), ``size_bytes``, ``sha256`` (empty string where the file is missing).
    """
    table: dict[str, list] = {"path": [], "size_bytes": [], "sha256": []}
    for path in paths:
        path = Path(path).expanduser().resolve()
        exists = path.is_file()
        table["path"].append(str(path))
        table["size_bytes"].append(path.stat().st_size if exists else -1)
        table["sha256"].append(sha256_file(path) if exists else "")
    return table


def prepared_dataset_files(path: str | Path, split: str) -> list[Path]:
    """List the files of a prepared dataset a prediction of ``split`` reads: dataset.json, tiles.csv, <split>/*.npy."""
    path = Path(path)
    return [path / "dataset.json", path / "tiles.csv", *sorted((path / split).glob("*.npy"))]


def checkpoint_files(checkpoint: str | Path) -> dict[str, list]:
    """Files of a checkpoint with sizes and sha256, from its ``manifest.json`` (no re-hashing of the weights).

    A checkpoint written before manifests existed is hashed here instead.
    """
    folder = Path(checkpoint)
    manifest = folder / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return file_table(sorted(p for p in folder.iterdir() if p.is_file()))
    table = file_table([manifest])
    for name, entry in sorted(files.items()):
        table["path"].append(str((folder / name).resolve()))
        table["size_bytes"].append(int(entry["size"]))
        table["sha256"].append(str(entry["sha256"]))
    return table


def source_files(meta: Mapping[str, Any]) -> list[str]:
    """Raw input files a prepared dataset was made from, as its ``dataset.json`` records them."""
    found = []
    for sample in meta.get("samples", []):
        for key, value in sample.get("meta", {}).items():
            if key.endswith(("_file", "_path")) and value not in ("", "None"):
                found.append(value)
    return found


def prediction_provenance(extras: Mapping[str, Any], data: str | Path, split: str, meta: Mapping[str, Any],
                          num_samples: int, input_record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Provenance of a prediction from a prepared dataset, for ``uns['diffst']['provenance']``.

    Parameters
    ----------
    extras
        What :func:`diffst.inference.predict.predict_checkpoint` returns beside the predictions
        (``checkpoint``, ``step``, ``weights``, ``sampler``, ``seed``, optionally ``base_checkpoint`` and
        ``base_step``).
    data, split
        The prepared dataset and split that were predicted.
    meta
        The dataset's ``dataset.json``.
    num_samples
        K, the samples actually drawn per tile (1 for a regression run).
    input_record
        Replaces the ``input`` entry (e.g. :func:`diffst.inference.whole_slide.raw_input_record` when the
        prepared dataset was only a temporary tiling of raw files).

    Returns
    -------
    dict
        ``created``, ``diffst_version``, ``torch_version``, ``python_version``, ``checkpoint``, ``step``,
        ``weights``, ``checkpoint_files`` (path / size_bytes / sha256), ``base_checkpoint`` and ``base_step``
        for a two-stage run, ``sampler``, ``seed``, ``num_samples``, ``input`` (``kind`` "prepared",
        ``dataset``, ``split``, ``files`` with sizes and sha256, ``source_files``: the raw files
        ``dataset.json`` names, with sizes and sha256 where they still exist).
    """
    import torch

    record: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "diffst_version": diffst.__version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "checkpoint": str(extras["checkpoint"]),
        "step": int(extras["step"]),
        "weights": str(extras.get("weights", "ema")),
        "checkpoint_files": checkpoint_files(extras["checkpoint"]),
        "sampler": dict(extras["sampler"]),
        "seed": int(extras["seed"]),
        "num_samples": int(num_samples),
        "input": input_record or {
            "kind": "prepared",
            "dataset": str(Path(data).expanduser().resolve()),
            "split": split,
            "files": file_table(prepared_dataset_files(data, split)),
            "source_files": file_table(source_files(meta)),
        },
    }
    if extras.get("base_checkpoint"):
        record["base_checkpoint"] = str(extras["base_checkpoint"])
        record["base_step"] = int(extras["base_step"])
    if extras.get("intervals"):
        record["intervals"] = dict(extras["intervals"])  # how the interval layers were made (and calibrated)
    return record
