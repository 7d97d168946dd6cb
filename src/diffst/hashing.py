"""The sha256 of a file, read in blocks: checkpoint manifests, the prediction store's identity and provenance."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["hash_file", "sha256_file"]


def hash_file(path: str | Path) -> tuple[int, str]:
    """Bytes read and hex sha256 of a file, read in 1 MiB blocks (a large file is never held in memory)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (:func:`hash_file`)."""
    return hash_file(path)[1]
