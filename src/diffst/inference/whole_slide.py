"""Whole-slide prediction from a raw sample: tile all tissue with overlap, predict, blend the seams.

The sample (read by the same readers as ``diffst prepare``) is tiled into a temporary prediction-only
dataset with the run's own genes and tile geometry, every tile with enough tissue, at a stride of half a
tile; the tiles are predicted like a prepared split and stitched with a smooth window
(:func:`tile_window`) so that no tile edge shows. :func:`seam_jump` measures what is left of the edges.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffst.errors import InputError


def tile_window(size: int, floor: float = 1e-3) -> np.ndarray:
    """Weight of each HR bin of a tile when overlapping tiles are blended: a 2-D sine-squared window.

    ``sin²(π (i + ½) / size)`` per axis is highest in the middle of the tile and falls smoothly towards the
    edges; tiles shifted by half a tile sum to a constant, so the blend is a partition of unity there. The
    ``floor`` keeps bins at the slide's edge, covered by one tile only, defined.

    Returns
    -------
    np.ndarray
        (size, size) float64 weights in [floor, 1].
    """
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.maximum(np.outer(w, w), floor)


def seam_jump(table: pd.DataFrame, values: np.ndarray, tiles: pd.DataFrame, hr_bin_um: float, tile_hr: int,
              ) -> dict[str, float]:
    """Mean absolute difference between neighbouring HR bins across tile edges versus inside tiles.

    Parameters
    ----------
    table
        Stitched bins of one sample (:func:`diffst.inference.predict.stitch`): ``row``, ``col``.
    values
        (n_bins, n_genes) the stitched map (e.g. the point estimate in counts).
    tiles
        The sample's tiles (``x0_um``, ``y0_um``), on the same grid as ``table``.
    hr_bin_um, tile_hr
        HR bin side and HR bins per tile side.

    Returns
    -------
    dict
        ``seam_mean_abs_diff`` over pairs of horizontally or vertically adjacent bins that lie on either side
        of some tile's edge, ``inside_mean_abs_diff`` over all other adjacent pairs, their ``ratio`` (1 = no
        visible seams) and the pair counts ``n_seam_pairs``, ``n_inside_pairs``.
    """
    rows, cols = table["row"].to_numpy(), table["col"].to_numpy()
    height, width = rows.max() + 1, cols.max() + 1
    grid = np.full((values.shape[1], height, width), np.nan)
    grid[:, rows, cols] = values.T
    offs_c = np.round((tiles["x0_um"].to_numpy() - tiles["x0_um"].min()) / hr_bin_um).astype(int)
    offs_r = np.round((tiles["y0_um"].to_numpy() - tiles["y0_um"].min()) / hr_bin_um).astype(int)
    # seam_h[r, c]: the pair (r, c) - (r, c + 1) straddles a tile's left or right edge; seam_v likewise.
    seam_h, seam_v = seam_masks(offs_r, offs_c, height, width, tile_hr)
    diff_h = np.abs(np.diff(grid, axis=2))
    diff_v = np.abs(np.diff(grid, axis=1))
    seam = np.concatenate([diff_h[:, seam_h].ravel(), diff_v[:, seam_v].ravel()])
    inside = np.concatenate([diff_h[:, ~seam_h].ravel(), diff_v[:, ~seam_v].ravel()])
    seam, inside = seam[np.isfinite(seam)], inside[np.isfinite(inside)]
    seam_mean = float(seam.mean()) if seam.size else float("nan")
    inside_mean = float(inside.mean()) if inside.size else float("nan")
    return {"seam_mean_abs_diff": seam_mean, "inside_mean_abs_diff": inside_mean,
            "ratio": seam_mean / inside_mean if inside_mean > 0 else float("nan"),
            "n_seam_pairs": int(seam.size // values.shape[1]), "n_inside_pairs": int(inside.size // values.shape[1])}


def seam_masks(offs_r: np.ndarray, offs_c: np.ndarray, height: int, width: int, tile_hr: int,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Which pairs of neighbouring bins straddle a tile edge (as :func:`seam_jump` counts them).

    Returns
    -------
    tuple
        ``seam_h`` (height, width - 1): the pair (r, c) - (r, c + 1) lies across some tile's left or right
        edge; ``seam_v`` (height - 1, width): the pair (r, c) - (r + 1, c) lies across a top or bottom edge.
        Booleans: one byte per bin whatever the number of genes.
    """
    seam_h = np.zeros((height, max(width - 1, 0)), bool)
    seam_v = np.zeros((max(height - 1, 0), width), bool)
    for r0, c0 in zip(offs_r, offs_c, strict=True):
        r1, c1 = r0 + tile_hr, c0 + tile_hr
        for c in (c0 - 1, c1 - 1):
            if 0 <= c < width - 1:
                seam_h[r0:r1, c] = True
        for r in (r0 - 1, r1 - 1):
            if 0 <= r < height - 1:
                seam_v[r, c0:c1] = True
    return seam_h, seam_v


class SeamAccumulator:
    """:func:`seam_jump` computed band by band, for a slide whose map is never held whole.

    Feed it consecutive bands of grid rows (:meth:`add`: (N, rows, width) values, NaN where no tile
    covers a bin) from the top; :meth:`result` gives the same statistics as :func:`seam_jump` on the whole
    map (sums of the same differences; only the order of summation differs).
    """

    def __init__(self, offs_r: np.ndarray, offs_c: np.ndarray, height: int, width: int, tile_hr: int):
        self.seam_h, self.seam_v = seam_masks(offs_r, offs_c, height, width, tile_hr)
        self.sums = {"seam": 0.0, "inside": 0.0}
        self.counts = {"seam": 0, "inside": 0}
        self.n_genes = None
        self._last_row: np.ndarray | None = None  # (N, width): the previous band's bottom row
        self._next_row = 0

    def _count(self, diffs: np.ndarray, mask: np.ndarray) -> None:
        for kind, pick in (("seam", mask), ("inside", ~mask)):
            values = diffs[:, pick]
            values = values[np.isfinite(values)]
            self.sums[kind] += float(values.sum())
            self.counts[kind] += int(values.size)

    def add(self, band: np.ndarray) -> None:
        """Take the next ``rows`` grid rows, (N, rows, width)."""
        band = np.asarray(band, float)
        self.n_genes = band.shape[0]
        top, rows = self._next_row, band.shape[1]
        if rows == 0:
            return
        self._count(np.abs(np.diff(band, axis=2)), self.seam_h[top : top + rows])
        if self._last_row is not None:  # the pair across the boundary with the previous band
            self._count(np.abs(band[:, :1] - self._last_row[:, None]), self.seam_v[top - 1 : top])
        if rows > 1:
            self._count(np.abs(np.diff(band, axis=1)), self.seam_v[top : top + rows - 1])
        self._last_row = band[:, -1].copy()
        self._next_row = top + rows

    def result(self) -> dict[str, float]:
        """Return the statistics of :func:`seam_jump` over all rows added so far."""
        n_genes = self.n_genes or 1
        seam_mean = self.sums["seam"] / self.counts["seam"] if self.counts["seam"] else float("nan")
        inside_mean = self.sums["inside"] / self.counts["inside"] if self.counts["inside"] else float("nan")
        return {"seam_mean_abs_diff": seam_mean, "inside_mean_abs_diff": inside_mean,
                "ratio": seam_mean / inside_mean if inside_mean > 0 else float("nan"),
                "n_seam_pairs": int(self.counts["seam"] // n_genes),
                "n_inside_pairs": int(self.counts["inside"] // n_genes)}


@contextlib.contextmanager
def whole_slide_tiles(samples: Sequence, run, workdir: str | Path | None = None, *, stride_um: float | None = None,
                      min_tissue_fraction: float = 0.25, progress: bool = True) -> Iterator[Path]:
    """Tile every sample whole into a temporary prediction-only dataset with the run's genes and geometry.

    Parameters
    ----------
    samples
        Samples read by :mod:`diffst.io` (each with its registered image).
    run
        The trained run (:func:`diffst.runs.load_run`); its dataset spec gives genes and tile geometry. A run
        trained in the self-supervised mode on spots gets the samples' real spots as LR and predicts their
        sub-spot map (:func:`~diffst.core.geometry.sub_spot_geometry`, ``prepare_dataset(sub_spot=True)``).
    workdir
        Folder for the temporary dataset (default: the system's temporary folder); removed on exit.
    stride_um
        Distance between tile corners; default half a tile, rounded to whole HR bins.
    min_tissue_fraction
        Tiles with less tissue are skipped (lower than ``prepare``'s 0.5 so that the tissue's edges are covered).

    Yields
    ------
    Path
        The prepared dataset; every tile is in its ``test`` split.
    """
    from diffst.data.prepare import SplitSpec, prepare_dataset
    from diffst.memory import release_memory

    if run.dataset is None:
        raise InputError(f"The run {run.path} records no dataset spec (genes, geometry), so a raw sample cannot be "
                         "tiled for it; prepare the sample with the run's genes and predict with --data.")
    geom = run.dataset.geometry
    sub_spot = run.dataset.self_supervised
    if sub_spot:  # a run that learnt from spots splits real spots: the sub-spot map, one scale finer
        from diffst.core.geometry import sub_spot_geometry

        geom = sub_spot_geometry(geom)
    if stride_um is None:
        stride_um = max(1, round(geom.tile_hr / 2)) * geom.hr_bin_um
    split = SplitSpec(test_samples=[s.name for s in samples], eval_stride_um=stride_um)
    data_log = logging.getLogger("diffst.data")
    # prepare warns that a dataset without training tiles is prediction-only: here that is the point.
    quiet = _DropMessages("prediction-only dataset")
    with tempfile.TemporaryDirectory(prefix=".diffst-whole-slide-", dir=workdir) as tmp:
        data_log.addFilter(quiet)
        try:
            path = prepare_dataset(samples, Path(tmp) / "tiles", geom, genes=list(run.dataset.genes), split=split,
                                   min_tissue_fraction=min_tissue_fraction, progress=progress, preview=False,
                                   sub_spot=sub_spot)
        finally:
            data_log.removeFilter(quiet)
        # The tiles hold all that prediction needs: let the samples (transcripts, image) go before it starts,
        # and hand the memory that reading and tiling used back to the system.
        del samples
        gc.collect()
        release_memory()
        yield path


class _DropMessages(logging.Filter):
    """Drop log records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def raw_input_record(samples: Sequence, inputs: Sequence[str | Path], reader_options: Mapping[str, Any]) -> dict:
    """Provenance of raw inputs: the paths given, reader options and the files read, with sizes and sha256.

    Returns
    -------
    dict
        ``kind`` "raw", ``given`` (paths), ``reader_options`` (as strings), ``files`` (path / size_bytes / sha256
        of the files the readers name, e.g. transcripts, matrix, positions, and each sample's image).
    """
    from diffst.inference.provenance import file_table, source_files

    files = source_files({"samples": [{"meta": {k: str(v) for k, v in s.meta.items()}} for s in samples]})
    files += [str(s.image.path) for s in samples if s.image is not None and s.image.path is not None]
    return {"kind": "raw", "given": [str(Path(p).expanduser().resolve()) for p in inputs],
            "reader_options": {k: str(v) for k, v in reader_options.items()},
            "files": file_table(dict.fromkeys(files))}
