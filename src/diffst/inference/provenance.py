r"""What a prediction was made from: checkpoint, sampler, seed, software and input files with their hashes.

The record is a nested dict of strings, numbers and lists only, so that it is written as it is into
AnnData ``uns`` (both ``.h5ad`` and zarr). File lists are stored as parallel columns (``path``, ``kind``,
``size_bytes``, ``sha256``) because AnnData cannot store a list of dicts, and file names with a ``/``
cannot be keys of an HDF5 group.

Each input is one row, whatever it is (:func:`file_table`):

* ``kind`` "file": ``size_bytes`` is the file's size and ``sha256`` the hex sha256 of its bytes
  (``sha256sum FILE``).
* ``kind`` "tree": a folder, e.g. a SpatialData ``.zarr`` store with thousands of chunk files, recorded as
  one row instead of one per file (:func:`tree_digest`). ``size_bytes`` is the total size of every file in
  it, and ``sha256`` is the sha256 of the lines ``"<relative path>\t<size in bytes>\t<sha256 of the
  file's bytes>\n"``, one per file, sorted by relative path (as UTF-8 bytes), joined and encoded as UTF-8.
  The relative path uses ``/`` and is taken from the folder given; every regular file counts, hidden ones
  (``.zgroup``, ``.zattrs``) too; symbolic links to files count as the file they point to, linked folders
  are not entered. Files are read in 1 MiB blocks, never held whole, so a store of any size is hashed in
  constant memory. Any change of one byte, of a file's name or of the set of files changes the digest; the
  same content in another place gives the same digest. For a folder without links it can be checked with::

      cd STORE && find . -type f -printf '%P\n' | LC_ALL=C sort | while IFS= read -r f; do
          printf '%s\t%s\t%s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum < "$f" | cut -d' ' -f1)"; done | sha256sum

* ``kind`` "missing": the path no longer exists (e.g. the raw files a prepared dataset was made from
  were moved); ``size_bytes`` is -1 and ``sha256`` empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import diffst
from diffst.hashing import hash_file


def tree_digest(folder: str | Path) -> tuple[int, str]:
    r"""Total size in bytes and digest of every file in a folder, as the module documents it ("tree" rows).

    Only the list of relative paths is held in memory; each file is hashed block by block.

    Returns
    -------
    (int, str)
        The sum of the files' sizes and the hex sha256 of the sorted lines ``path\tsize\tsha256\n``.
    """
    folder = Path(folder)

    def fail(exc: OSError) -> None:
        raise exc

    names = []
    for dirpath, _, filenames in os.walk(folder, onerror=fail):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_file():  # follows a link to a file; skips broken links, sockets, fifos
                names.append(file.relative_to(folder).as_posix().encode("utf-8", "surrogateescape"))
    names.sort()
    digest, total = hashlib.sha256(), 0
    for rel in names:
        size, content = hash_file(folder / os.fsdecode(rel))
        digest.update(rel + f"\t{size}\t{content}\n".encode())
        total += size
    return total, digest.hexdigest()


def file_table(paths: Iterable[str | Path]) -> dict[str, list]:
    """Paths, kinds, sizes and sha256 of inputs, as parallel lists: files, folders (one "tree" row each) or missing.

    Returns
    -------
    dict
        ``path`` (absolute), ``kind`` ("file", "tree" or "missing"), ``size_bytes`` (a folder's total, -1
        where missing), ``sha256`` (a file's; a folder's digest as the module documents it; empty where
        missing).
    """
    table: dict[str, list] = {"path": [], "kind": [], "size_bytes": [], "sha256": []}
    for path in paths:
        path = Path(path).expanduser().resolve()
        if path.is_file():
            kind, (size, digest) = "file", hash_file(path)
        elif path.is_dir():
            kind, (size, digest) = "tree", tree_digest(path)
        else:
            kind, size, digest = "missing", -1, ""
        table["path"].append(str(path))
        table["kind"].append(kind)
        table["size_bytes"].append(size)
        table["sha256"].append(digest)
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
        table["kind"].append("file")
        table["size_bytes"].append(int(entry["size"]))
        table["sha256"].append(str(entry["sha256"]))
    return table


def source_files(meta: Mapping[str, Any]) -> list[str]:
    """Raw inputs a prepared dataset was made from, as its ``dataset.json`` records them.

    The values of the samples' ``meta`` keys ending in ``_file`` or ``_path`` (e.g. ``transcripts_file``)
    and ``_store`` (``spatialdata_store``: a SpatialData store, hashed as one "tree" by :func:`file_table`).
    """
    found = []
    for sample in meta.get("samples", []):
        for key, value in sample.get("meta", {}).items():
            if key.endswith(("_file", "_path", "_store")) and value not in ("", "None"):
                found.append(value)
    return found


def prediction_provenance(extras: Mapping[str, Any], data: str | Path, split: str, meta: Mapping[str, Any],
                          num_samples: int, input_record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Provenance of a prediction from a prepared dataset, for ``uns['diffst']['provenance']``.

    Parameters
    ----------
    extras
        What :func:`diffst.inference.predict.predict_checkpoint` returns beside the predictions
        (``checkpoint``, ``step``, ``weights``, ``sampler``, ``seed``, optionally ``base_checkpoint``,
        ``base_step``, ``base_members`` and ``members``).
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
        for a two-stage run (``base_members``: the other checkpoints of a seed-ensemble base; ``members``: those
        of a regression ensemble predicted alone), ``sampler``, ``seed``, ``num_samples``, ``input`` (``kind`` "prepared",
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
    for key in ("base_members", "members"):
        if extras.get(key):
            record[key] = [str(p) for p in extras[key]]
    if extras.get("intervals"):
        record["intervals"] = dict(extras["intervals"])  # how the interval layers were made (and calibrated)
    return record
