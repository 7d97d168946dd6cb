"""Per-tile prediction store: finished tiles on disk, so a killed ``diffst predict`` resumes where it stopped.

While ``diffst predict --out NAME`` runs, every finished tile's layers (point estimate, std, interval bounds,
in counts) are written to a hidden folder beside the output, ``.NAME.partial/``, one ``tile_<index>.npz`` per
tile, each written under a temporary name and renamed into place (a file there is always complete). The
folder's ``manifest.json`` records what the tiles were made from: the checkpoint (path, step, weights and
the sha256 of its manifest), the sampler settings, seed, K, batch size and the identity of the tiles' input
(sha256 of the split's arrays and tile table). A rerun with the same setup reuses the finished tiles and
samples only the rest; a rerun with any other setup discards them (they are the program's own files) and
starts again. The folder is removed once the output is written. A folder of that name that Diff-ST did not
create is never touched: the run stops with an error instead.

Tile results do not depend on which tiles were already done: batches are fixed runs of ``batch_size``
consecutive tiles, and each batch's noise comes from a generator seeded with (seed, batch index), so a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffst.errors import InputError
from diffst.hashing import sha256_file

log = logging.getLogger("diffst.inference")

STORE_FORMAT = "diffst-prediction-tiles-1"
MANIFEST = "manifest.json"
LOCK = "lock"
_TILE = re.compile(r"^tile_(\d+)\.npz$")
_TEMP = re.compile(r"^tile_\d+\.npz\.tmp-\d+$")


def store_path(out: str | Path) -> Path:
    """Return the hidden per-tile store of the output ``out``: ``.<name>.partial`` in the same folder."""
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.partial"


def run_identity(run) -> dict[str, Any]:
    """Identify a trained run's weights: checkpoint path, step, weights and a hash of its files.

    The hash is the sha256 of the checkpoint's ``manifest.json`` (which holds the sha256 of every other file)
    or, for checkpoints written before manifests, of all its files. A two-stage run adds its regression
    stage's identity under ``base``; a seed ensemble its other members' under ``members``.
    """
    path = Path(run.path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        digest = sha256_file(manifest)
    else:
        combined = hashlib.sha256()
        for file in sorted(p for p in path.iterdir() if p.is_file()):
            combined.update(file.name.encode() + b"\0" + sha256_file(file).encode())
        digest = combined.hexdigest()
    record = {"checkpoint": str(path.resolve()), "step": int(run.step), "weights": str(run.weights),
              "sha256": digest}
    if getattr(run, "base", None) is not None:
        record["base"] = run_identity(run.base)
    if getattr(run, "members", ()):
        record["members"] = [run_identity(m) for m in run.members]
    return record


def dataset_identity(dataset) -> dict[str, Any]:
    """Identify the tiles a prediction is made from, whatever folder holds them.

    The split's arrays (``lr_counts``, ``lr_mask``, ``tissue``, ``cells``, ``cell_entropy``: everything the
    model sees), the tiles' samples and positions, genes and geometry. A temporary whole-slide tiling made
    again from the same raw files has the same identity.
    """
    folder = Path(dataset.path) / dataset.split
    arrays = {}
    for name in ("lr_counts", "lr_mask", "tissue", "cells", "cell_entropy"):
        file = folder / f"{name}.npy"
        arrays[name] = sha256_file(file) if file.is_file() else None
    tiles = dataset.tiles[["sample", "x0_um", "y0_um"]].to_csv(index=False).encode()
    return {"split": dataset.split, "n_tiles": len(dataset), "genes": list(dataset.genes),
            "geometry": dataset.geometry.to_dict(), "tiles_sha256": hashlib.sha256(tiles).hexdigest(),
            "arrays_sha256": arrays}


class TileStore:
    """The per-tile results of one prediction, in a hidden folder beside its output (see the module doc).

    Open it with :meth:`open`; it holds an exclusive lock on the folder until :meth:`close` or :meth:`remove`,
    so two predictions never write the same store.
    """

    def __init__(self, path: Path, identity: Mapping[str, Any], lock_fh):
        self.path = path
        self.identity = dict(identity)
        self._lock_fh = lock_fh

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, identity: Mapping[str, Any]) -> TileStore:
        """Open the store at ``path`` for a prediction with ``identity`` (JSON-serialisable).

        A store of the same identity is reused as it is; one of another identity is emptied (its tiles came
        from another checkpoint, sampler, seed or input); a missing one is created.

        Raises
        ------
        InputError
            If ``path`` exists but is not a prediction store Diff-ST created, or another process holds it.
        """
        path = Path(path)
        identity = json.loads(json.dumps(identity, default=str))  # as it reads back from the manifest
        if path.exists() and not path.is_dir():
            raise InputError(f"{path} exists and is not a folder; Diff-ST keeps the finished tiles of a prediction "
                             "there. Move it away or choose another --out.")
        if path.is_dir() and any(path.iterdir()) and not cls.is_store(path):
            raise InputError(f"{path} exists and was not written by Diff-ST (no prediction-store manifest), so it is "
                             "left alone. Move it away or choose another --out.")
        path.mkdir(parents=True, exist_ok=True)
        lock_fh = _lock(path / LOCK)
        try:
            manifest = path / MANIFEST
            old = _read_manifest(manifest) if manifest.exists() else None
            store = cls(path, identity, lock_fh)
            if old is not None and old.get("identity") == identity:
                return store
            stale = store.finished()
            if stale:
                log.warning("discarding %d finished tiles in %s: they were predicted with another checkpoint, "
                            "sampler, seed, K or input", len(stale), path)
            store._clear_tiles()
            _write_json_atomic(manifest, {"format": STORE_FORMAT, "identity": identity})
            return store
        except BaseException:
            _unlock(lock_fh)
            raise

    @staticmethod
    def is_store(path: str | Path) -> bool:
        """Tell whether ``path`` is a folder this module created (it holds a prediction-store manifest)."""
        manifest = Path(path) / MANIFEST
        try:
            return _read_manifest(manifest) is not None
        except InputError:
            return False

    # -- tiles -------------------------------------------------------------------------------------------
    def tile_path(self, index: int) -> Path:
        """Where tile ``index``'s layers are kept."""
        return self.path / f"tile_{int(index):07d}.npz"

    def finished(self) -> set[int]:
        """Return the indices of the tiles whose files are in place (complete: they are renamed in only when written)."""
        done = set()
        for child in self.path.iterdir():
            match = _TILE.match(child.name)
            if match:
                done.add(int(match.group(1)))
        return done

    def write(self, index: int, layers: Mapping[str, np.ndarray]) -> None:
        """Write one tile's layers (name -> array) atomically: the file appears complete or not at all."""
        final = self.tile_path(index)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **{k: np.ascontiguousarray(v) for k, v in layers.items()})
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read(self, index: int) -> dict[str, np.ndarray] | None:
        """Return tile ``index``'s layers, or None when its file is missing or unreadable (then it is redone)."""
        try:
            with np.load(self.tile_path(index)) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def discard(self, index: int) -> None:
        """Remove tile ``index``'s file (e.g. an unreadable one), so that it is predicted again."""
        self.tile_path(index).unlink(missing_ok=True)

    # -- closing -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the lock and keep the tiles (a rerun of the same prediction resumes from them)."""
        if self._lock_fh is not None:
            _unlock(self._lock_fh)
            self._lock_fh = None

    def remove(self) -> None:
        """Delete the store: its tiles, manifest and lock, then the folder if nothing else is in it."""
        self._clear_tiles()
        (self.path / MANIFEST).unlink(missing_ok=True)
        (self.path / LOCK).unlink(missing_ok=True)
        self.close()
        with contextlib.suppress(OSError):  # something not ours inside: leave the folder
            self.path.rmdir()

    def _clear_tiles(self) -> None:
        for child in self.path.iterdir():
            if _TILE.match(child.name) or _TEMP.match(child.name):
                child.unlink(missing_ok=True)

    def __enter__(self) -> TileStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_manifest(path: Path) -> dict | None:
    """Read the store manifest at ``path``: None when missing; InputError when it is not one of ours."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise InputError(f"{path} is not a Diff-ST prediction-store manifest.") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise InputError(f"{path} is not a Diff-ST prediction-store manifest.")
    return data


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _lock(path: Path):
    """Take an exclusive, non-blocking lock on ``path`` (created); InputError when another process holds it."""
    fh = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the store
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise InputError(f"Another diffst predict is writing {path.parent} (the same --out); wait for it to finish "
                         "or choose another --out.") from None
    return fh


def _unlock(fh) -> None:
    with contextlib.suppress(OSError):
        fh.close()


def dataset_maps(dataset) -> list:
    """List the memory-mapped arrays of a prepared split (:class:`diffst.data.dataset.PreparedTiles`)."""
    names = ("lr_counts", "lr_mask", "hr_counts", "hr_mask", "tissue", "cells", "cell_entropy")
    return [getattr(dataset, name, None) for name in names]
