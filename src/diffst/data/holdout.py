"""Held-out blocks of the training tissue: model selection when a dataset has no validation split.

A small slide (the built-in crop, one fold of a cross-validation, one HER2ST section) often has no room for
a validation region beside its test region, yet a regression trained on it learns the training transcripts
by heart after a few hundred steps. :func:`holdout_bins` marks a fixed share of the training tissue as
held out: squares one LR spot wide on a grid fixed in microns (so overlapping training tiles agree on every
bin), drawn by a hash of (sample, square, seed). Training leaves those bins out of its loss; validation
scores the same training tiles on them only (:class:`diffst.data.dataset.PreparedTiles` ``holdout``). The
inputs (LR spots, image) of a held-out square stay visible, as they are at prediction time; only its HR
counts are hidden.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from diffst.core.geometry import TileGeometry

__all__ = ["BinHoldout", "holdout_bins"]


@dataclass(frozen=True)
class BinHoldout:
    """Which bins of a training split a dataset keeps: all but the held-out squares, or only those.

    Attributes
    ----------
    fraction
        Share of the squares held out, in (0, 1).
    seed
        Seed of the draw (the run's seed).
    keep
        ``"rest"``: the training view (held-out bins masked out of ``hr_mask``); ``"held"``: the validation
        view (only the held-out bins left in ``hr_mask``).
    """

    fraction: float
    seed: int = 0
    keep: Literal["rest", "held"] = "rest"

    def __post_init__(self):
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"the held-out fraction must be in (0, 1), got {self.fraction}")
        if self.keep not in ("rest", "held"):
            raise ValueError(f"keep must be 'rest' or 'held', got {self.keep!r}")


def _mix(values: np.ndarray) -> np.ndarray:
    """Hash 64-bit integers elementwise (splitmix64's finaliser); uint64 in, uint64 out."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def holdout_bins(tiles: pd.DataFrame, geometry: TileGeometry, fraction: float, seed: int = 0) -> np.ndarray:
    """Mark the HR bins of each tile that fall in a held-out square.

    Parameters
    ----------
    tiles
        One row per tile, in item order, with ``sample``, ``x0_um`` and ``y0_um`` (a prepared split's
        ``tiles.csv`` rows).
    geometry
        The tiles' geometry: the square is one LR spot wide (``lr_bin_um``), HR bins ``hr_bin_um``.
    fraction
        Share of squares held out.
    seed
        Seed of the draw.

    Returns
    -------
    np.ndarray
        (T, H, W) bool, True where a bin's centre lies in a held-out square. The same point of the tissue
        gets the same answer in every tile that covers it.
    """
    n = geometry.tile_hr
    centres = (np.arange(n) + 0.5) * geometry.hr_bin_um
    side = geometry.lr_bin_um
    x = np.asarray(tiles["x0_um"], dtype=np.float64)[:, None] + centres[None, :]  # (T, W)
    y = np.asarray(tiles["y0_um"], dtype=np.float64)[:, None] + centres[None, :]  # (T, H)
    # Squares indexed on a grid fixed at 0 µm; offsets keep the indices non-negative for the hash.
    col = (np.floor(x / side).astype(np.int64) + (1 << 20)).astype(np.uint64)
    row = (np.floor(y / side).astype(np.int64) + (1 << 20)).astype(np.uint64)
    sample = np.array([zlib.crc32(str(s).encode()) for s in tiles["sample"]], dtype=np.uint64)
    key = _mix(sample[:, None, None] ^ _mix(np.uint64(seed & 0xFFFFFFFF) + (row[:, :, None] << np.uint64(21))
                                            + col[:, None, :]))
    uniform = (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return uniform < fraction
