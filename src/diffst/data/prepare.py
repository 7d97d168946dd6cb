"""Prepare a dataset of registered tiles on disk.

On-disk format (``FORMAT_VERSION`` 2), a folder::

    dataset.json            geometry, genes, normalisation, splits, samples, provenance
    tiles.csv               one row per tile: tile_id, split, index (row within its split), sample,
                            x0_um, y0_um, x1_um, y1_um, n_counts, tissue_fraction
    <split>/lr_counts.npy   float32 (T, N, tile_lr, tile_lr)  raw counts per LR bin
    <split>/lr_mask.npy     bool    (T, tile_lr, tile_lr)     LR bins that were measured
    <split>/hr_counts.npy   float32 (T, N, tile_hr, tile_hr)  raw counts per HR bin (when has_hr)
    <split>/hr_mask.npy     bool    (T, tile_hr, tile_hr)     HR bins that were measured (when has_hr)
    <split>/tissue.npy      uint8   (T, C, tissue_px, tissue_px)
    <split>/cells.npy       uint8   (T, M, C, cell_px, cell_px)  row-major over the cell grid
    <split>/cell_entropy.npy float32 (T, M)                   Shannon entropy (bits) of each patch
    preview.png             histology / LR / HR of a few genes on one tile

``has_hr`` holds for point data (HR = binned transcripts, every HR bin measured) and for spot data
prepared in the self-supervised mode (``self_supervised`` in ``dataset.json``: HR = the spots, one HR
bin per spot pitch, bins without a spot unmeasured; see :mod:`diffst.data.tiling`). Version 1 datasets
(no ``hr_mask.npy``; every HR bin measured) are still read.

Splits are ``train``, ``val`` and ``test``. A tile belongs to one split only, and no training tile
overlaps a val/test region or comes from a val/test sample, so no test pixel is ever seen in training.
Everything is written to a temporary folder first and moved into place at the end. Tiles are written as
they are made (``np.save``'s format, one tile appended at a time), so memory does not grow with the number of
tiles; the normaliser is fitted from running per-gene maxima.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, field_validator
from tqdm.auto import tqdm

import diffst
from diffst.atomic import atomic_output, check_replaceable
from diffst.core.geometry import TileGeometry
from diffst.core.sample import Sample
from diffst.data.normalise import LogScaleNormaliser
from diffst.data.tiling import PointIndex, TileArrays, intersects, make_tile, plan_origins
from diffst.errors import GeometryError, InputError

FORMAT_VERSION = 2
#: Versions this code reads: v1 lacks ``hr_mask.npy`` (its HR bins are all measured).
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val", "test")
DATASET_ENTRIES = {"dataset.json", "tiles.csv", "preview.png", *SPLITS}
log = logging.getLogger("diffst.data")
Rect = tuple[float, float, float, float]


class SplitSpec(BaseModel):
    """How tiles are assigned to splits: whole samples, and/or held-out rectangles (µm) inside samples."""

    test_samples: list[str] = Field(default_factory=list)
    val_samples: list[str] = Field(default_factory=list)
    test_region: Rect | None = None
    val_region: Rect | None = None
    train_stride_um: float | None = Field(None, gt=0)  # default: half a tile
    eval_stride_um: float | None = Field(None, gt=0)  # default: half a tile (val/test)

    @field_validator("test_region", "val_region")
    @classmethod
    def _finite_rectangle(cls, rect: Rect | None, info) -> Rect | None:
        if rect is None:
            return rect
        flag = "--" + info.field_name.replace("_", "-")
        if not all(math.isfinite(v) for v in rect):
            raise ValueError(f"{flag} {','.join(map(str, rect))} holds a value that is not a finite number; "
                             "give x0,y0,x1,y1 in microns")
        if rect[2] <= rect[0] or rect[3] <= rect[1]:
            raise ValueError(f"{flag} {','.join(map(str, rect))} is empty: it needs x0 < x1 and y0 < y1 (microns)")
        return rect


def select_genes(samples: Sequence[Sample], n_genes: int | None, genes: Sequence[str] | None,
                 exclude: dict[str, list[Rect]] | None = None) -> list[str]:
    """Choose the genes: the given list, or the top-N genes by total counts in the training data.

    A given list is checked against every sample; the top N are counted outside held-out samples and
    regions, among genes present in every sample. ``exclude`` maps each training sample to its held-out
    rectangles (samples missing from it are held out whole); None counts every sample everywhere.
    """
    if genes:
        repeated = sorted({g for g in genes if list(genes).count(g) > 1})
        if repeated:
            raise InputError(f"The gene list names {repeated} more than once; list each gene once (--genes).")
        for s in samples:
            s.gene_indices(list(genes))
        return list(genes)
    if not n_genes or n_genes < 1:
        raise InputError(f"n_genes must be a positive number of genes, got {n_genes}; or pass a gene list.")
    common = set(samples[0].genes).intersection(*[s.genes for s in samples[1:]])
    totals = pd.Series(0.0, index=sorted(common))
    for s in samples:
        rects = [] if exclude is None else exclude.get(s.name)
        if rects is None:
            continue
        xy = s.xy_um()
        keep = np.ones(len(xy), dtype=bool)
        for r in rects:
            keep &= ~((xy[:, 0] >= r[0]) & (xy[:, 0] < r[2]) & (xy[:, 1] >= r[1]) & (xy[:, 1] < r[3]))
        if s.has_points:
            per_gene = np.bincount(s.transcripts["gene"].to_numpy()[keep], minlength=len(s.genes))
        else:
            per_gene = np.asarray(s.spots.counts[keep].sum(axis=0)).ravel()
        series = pd.Series(per_gene, index=s.genes)
        totals += series.reindex(totals.index).fillna(0)
    if len(totals) < n_genes:
        raise InputError(f"Only {len(totals)} genes are shared by all samples; asked for the top {n_genes}.")
    ranked = totals.sort_values(ascending=False, kind="stable")
    return list(ranked.index[:n_genes])


def _sample_region(sample: Sample, geom: TileGeometry) -> Rect:
    """Where tiles may go: the image, cut to the extent of the expression data."""
    ix0, iy0, ix1, iy1 = sample.image.extent_um()
    dx0, dy0, dx1, dy1 = sample.extent_um()
    # Data rarely reach the last pixel: allow a tile edge up to one HR bin (or half a spot) past them.
    pad = max(geom.hr_bin_um, sample.spots.diameter_um / 2 if sample.spots is not None else 0.0)
    region = (max(ix0, dx0 - pad), max(iy0, dy0 - pad), min(ix1, dx1 + pad), min(iy1, dy1 + pad))
    if region[2] - region[0] < geom.tile_um or region[3] - region[1] < geom.tile_um:
        raise GeometryError(
            f"Sample {sample.name}: the imaged area with data is {region[2] - region[0]:.0f} x {region[3] - region[1]:.0f} µm, "
            f"smaller than one {geom.tile_um:g} µm tile. Use a smaller tile preset (--preset cpu), or check the "
            "image pixel size."
        )
    return region


def plan_tiles(samples: Sequence[Sample], geom: TileGeometry, split: SplitSpec) -> list[tuple[str, str, float, float]]:
    """(split, sample name, x0, y0) of every candidate tile."""
    names = {s.name for s in samples}
    for listed in (split.test_samples, split.val_samples):
        unknown = set(listed) - names
        if unknown:
            raise InputError(f"Split names unknown sample(s) {sorted(unknown)}; samples are {sorted(names)}.")
    # Default: half a tile, in whole HR bins (so overlapping tiles share bins whatever tile_hr is).
    half = max(1, geom.tile_hr // 2) * geom.hr_bin_um
    train_stride = half if split.train_stride_um is None else split.train_stride_um
    eval_stride = half if split.eval_stride_um is None else split.eval_stride_um
    plan = []
    for s in samples:
        region = _sample_region(s, geom)
        if s.name in split.test_samples or s.name in split.val_samples:
            which = "test" if s.name in split.test_samples else "val"
            plan += [(which, s.name, x, y) for x, y in plan_origins(region, geom, eval_stride)]
            continue
        held = {k: r for k, r in (("test", split.test_region), ("val", split.val_region)) if r is not None}
        for which, rect in held.items():
            plan += [(which, s.name, x, y) for x, y in _held_out_origins(s, rect, region, geom, eval_stride, which)]
        for x, y in plan_origins(region, geom, train_stride):
            box = (x, y, x + geom.tile_um, y + geom.tile_um)
            if not any(intersects(box, r) for r in held.values()):
                plan.append(("train", s.name, x, y))
    return plan


def _held_out_origins(sample: Sample, rect: Rect, region: Rect, geom: TileGeometry, stride: float,
                      which: str) -> list[tuple[float, float]]:
    """Tile origins inside a held-out rectangle, cut to the sample's data.

    A rectangle that misses the data or is too small for one tile is an error in the user's terms.
    """
    sub = (max(rect[0], region[0]), max(rect[1], region[1]), min(rect[2], region[2]), min(rect[3], region[3]))
    flag = f"--{which}-region {','.join(f'{v:g}' for v in rect)}"
    extent = ",".join(f"{v:.0f}" for v in region)
    if sub[2] <= sub[0] or sub[3] <= sub[1]:
        raise GeometryError(f"{flag} lies outside the data of sample {sample.name} (x0,y0,x1,y1 = {extent} µm). "
                            "Give a region inside that extent, in slide microns.")
    if sub[2] - sub[0] < geom.tile_um - 1e-6 or sub[3] - sub[1] < geom.tile_um - 1e-6:
        raise GeometryError(
            f"{flag} covers only {sub[2] - sub[0]:.0f} x {sub[3] - sub[1]:.0f} µm of sample {sample.name}'s data "
            f"(extent {extent} µm), less than one {geom.tile_um:g} µm tile. Enlarge the region.")
    return plan_origins(sub, geom, stride)


def _normaliser_split(counts: dict[str, int], split: SplitSpec, samples: Sequence[Sample]) -> str:
    """Name the split the normalisation is fitted on (``counts``: tiles per split).

    Always train, except for a prediction-only dataset (every sample held out whole), whose own
    normaliser only serves display; predictions use the model's.
    """
    if counts["train"]:
        return "train"
    held_samples = set(split.test_samples) | set(split.val_samples)
    if held_samples >= {s.name for s in samples}:
        which = "val" if counts["val"] else "test"
        log.warning("no training tiles: every sample is held out, so this is a prediction-only dataset; its "
                    "normaliser is fitted on the %d %s tiles (predict uses the model's own)", counts[which], which)
        return which
    regions = "; ".join(f"--{k}-region {','.join(f'{v:g}' for v in r)}" for k, r in
                        (("test", split.test_region), ("val", split.val_region)) if r is not None)
    raise InputError(
        f"No training tiles are left: the held-out regions ({regions or 'none'}) cover all tissue with enough "
        f"room for a tile ({counts['val']} val, {counts['test']} test tiles). Shrink the held-out regions, "
        "or hold out whole samples (--test-sample) to prepare a prediction-only dataset.")


def prepare_dataset(
    samples: Sequence[Sample],
    out_dir: str | Path,
    geometry: TileGeometry,
    *,
    n_genes: int | None = 25,
    genes: Sequence[str] | None = None,
    split: SplitSpec | None = None,
    min_tissue_fraction: float = 0.5,
    overwrite: bool = False,
    progress: bool = True,
    preview: bool = True,
    self_supervised: bool = False,
    sub_spot: bool = False,
) -> Path:
    """Tile samples into a prepared dataset folder (format in this module's docstring).

    Returns the folder. Writes ``dataset.json``, ``tiles.csv``, the per-split arrays and
    ``preview.png``. The normalisation is fitted on the training tiles only.

    ``self_supervised=True`` prepares spot-only slides (Visium, legacy ST) to train on themselves: their
    spots become the HR ground truth, one HR bin per spot pitch, with an HR mask of the bins holding a
    spot, and LR is s x s block sums of them (:func:`diffst.data.tiling.tile_spots_as_hr`). Use a geometry
    from :func:`diffst.core.geometry.spot_pitch_geometry` (its ``hr_bin_um`` must be within 10 % of the
    spot pitch). Tiles without any spot are skipped.

    ``sub_spot=True`` prepares spot-only slides for the sub-spot map of such a model: the real spots are
    the LR input, one LR bin per spot pitch (spots sharing a bin averaged, as in self-supervised HR), no HR.
    Use :func:`diffst.core.geometry.sub_spot_geometry` of the training geometry.
    """
    split = split or SplitSpec()
    if not samples:
        raise InputError("No samples given to prepare.")
    if self_supervised and sub_spot:
        raise InputError("self_supervised (train on the spots) and sub_spot (predict below the spots) exclude each "
                         "other; prepare one dataset for each.")
    if self_supervised:
        _check_self_supervised(samples, geometry)
    if sub_spot:
        _check_self_supervised(samples, geometry, "lr_bin_um", "sub_spot")
    out_dir = check_replaceable(out_dir, "prepared dataset", is_prepared_dataset, overwrite)
    for s in samples:
        if s.image is None:
            raise InputError(f"Sample {s.name} has no image; Diff-ST needs the registered histology image.")
        s.check_registration()
    if len({s.name for s in samples}) != len(samples):
        raise InputError("Sample names must be unique; give each sample its own name.")
    channels = {s.image.n_channels for s in samples}
    if len(channels) > 1:
        raise InputError(f"Samples mix images with {sorted(channels)} channels; use one kind of image per dataset.")
    plan = plan_tiles(samples, geometry, split)
    held = [r for r in (split.test_region, split.val_region) if r is not None]
    exclude = {s.name: held for s in samples if s.name not in split.test_samples + split.val_samples}
    chosen = select_genes(samples, n_genes, genes, exclude)
    by_name = {s.name: s for s in samples}
    gene_idx = {s.name: s.gene_indices(chosen) for s in samples}

    has_hr = self_supervised or all(s.has_points for s in samples)
    planned = {k: sum(1 for p in plan if p[0] == k) for k in SPLITS}
    indexes = {s.name: PointIndex(s) for s in samples if s.has_points}
    made = _missing_parents(out_dir)
    try:
        with atomic_output(out_dir, directory=True) as tmp:
            writer = _TileWriter(tmp, planned, has_hr, geometry.scale)
            rows, skipped = [], 0
            try:
                for which, name, x, y in tqdm(plan, desc="Preparing tiles", unit="tile", disable=not progress):
                    tile = make_tile(by_name[name], gene_idx[name], geometry.at(x, y), self_supervised, sub_spot,
                                     indexes.get(name))
                    if tile.tissue_fraction < min_tissue_fraction or (self_supervised and not tile.hr_mask.any()):
                        skipped += 1
                        continue
                    rows.append({"split": which, "index": writer.count[which], "sample": name, "x0_um": x,
                                 "y0_um": y, "x1_um": x + geometry.tile_um, "y1_um": y + geometry.tile_um,
                                 "n_counts": tile.n_transcripts, "tissue_fraction": round(tile.tissue_fraction, 4)})
                    writer.add(which, tile)  # on disk now: memory holds no tile beyond this one
            except BaseException:
                writer.close(complete=False)
                raise
            writer.close()
            if not rows:
                raise InputError(
                    f"No tile has tissue (all {len(plan)} candidate tiles have less than {min_tissue_fraction:.0%} "
                    "tissue). Check that the image shows the tissue where the data are, or lower min_tissue_fraction."
                )
            _check_no_leak(rows)
            fit_split = _normaliser_split(writer.count, split, samples)
            normaliser = writer.normaliser(fit_split, chosen)
            table = pd.DataFrame(rows)
            table.insert(0, "tile_id", [f"{r['split']}_{r['index']:05d}" for r in rows])
            table.to_csv(tmp / "tiles.csv", index=False)
            meta = {
                "format": "diffst-prepared",
                "format_version": FORMAT_VERSION,
                "diffst_version": diffst.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "geometry": geometry.to_dict(),
                "genes": chosen,
                "normaliser": normaliser.model_dump(),
                "normaliser_fitted_on": fit_split,
                "has_hr": has_hr,
                "self_supervised": bool(self_supervised),
                "sub_spot": bool(sub_spot),
                "hr_source": "spots" if self_supervised else ("transcripts" if has_hr else None),
                "image_channels": int(samples[0].image.n_channels),
                "split": split.model_dump(),
                "n_tiles": dict(writer.count),
                "skipped_tiles_without_tissue": skipped,
                "min_tissue_fraction": min_tissue_fraction,
                "samples": [{"name": s.name, "platform": s.platform, "pixel_size_um": s.image.pixel_size_um,
                             "um_to_px": s.image.um_to_px.tolist(),
                             "meta": {k: str(v) for k, v in s.meta.items()}} for s in samples],
            }
            if preview:
                from diffst.plotting.preview import plot_tile_preview

                plot_tile_preview(writer.best_tile(), chosen, tmp / "preview.png", normaliser=None)
            # Written last: a folder with dataset.json is a complete dataset.
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    except BaseException:
        for folder in made:  # parents this call created for the output; atomic_output removed the rest
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return out_dir


def _missing_parents(path: Path) -> list[Path]:
    """Return the ancestors of ``path`` that do not exist yet, deepest first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


class _NpyAppender:
    """Write a ``.npy`` file one row (tile) at a time; the file is what ``np.save`` of the stacked rows writes.

    The header's room is reserved for ``max_rows`` rows; :meth:`close` writes the header of the rows actually
    given and, when that header is shorter (fewer digits), moves the data up to meet it, so the bytes equal
    ``np.save``'s. Memory holds one row at a time.
    """

    shift_step = 64 << 20  # bytes moved at a time when the header shrinks

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...], max_rows: int):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self._row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
        self._reserved = len(self._header(max_rows))
        self._fh = open(path, "w+b")  # noqa: SIM115 - stays open across add() calls; closed in close()
        self._fh.write(b"\0" * self._reserved)

    def _header(self, rows: int) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": (rows, *self.row_shape)})
        return buffer.getvalue()

    def add(self, row: np.ndarray) -> np.ndarray:
        """Append one row; returns it as stored (the file's dtype)."""
        row = np.ascontiguousarray(row, dtype=self.dtype)
        if row.shape != self.row_shape:
            raise ValueError(f"{self.path.name}: a tile of shape {row.shape} among tiles of shape {self.row_shape}")
        self._fh.write(row.tobytes())
        self.rows += 1
        return row

    def close(self, complete: bool = True) -> None:
        """Write the final header (``complete``) and close; an incomplete file is left to the caller to delete."""
        if self._fh.closed:
            return
        try:
            if complete:
                header = self._header(self.rows)
                if len(header) < self._reserved:  # shift the data up to the shorter header, step by step
                    size, step = self.rows * self._row_bytes, self.shift_step
                    for done in range(0, size, step):
                        self._fh.seek(self._reserved + done)
                        chunk = self._fh.read(min(step, size - done))
                        self._fh.seek(len(header) + done)
                        self._fh.write(chunk)
                    self._fh.truncate(len(header) + size)
                self._fh.seek(0)
                self._fh.write(header)
        finally:
            self._fh.close()


#: The per-split arrays: name -> (dtype, or None for the tile's own; the tile's array).
_ARRAYS = {
    "lr_counts": (np.float32, lambda t: t.lr_counts),
    "lr_mask": (None, lambda t: t.lr_mask),
    "hr_counts": (np.float32, lambda t: t.hr_counts),
    "hr_mask": (bool, lambda t: t.measured_hr()),
    "tissue": (None, lambda t: t.tissue),
    "cells": (None, lambda t: t.cells),
    "cell_entropy": (None, lambda t: t.cell_entropy),
}


class _TileWriter:
    """Write a prepared dataset's split arrays tile by tile (format in the module docstring).

    Keeps, per split, only the tile count, the per-gene maximum and minimum of the counts the normaliser is
    fitted on (HR counts, or LR counts for spot data without HR), and the tile with the most counts (for
    the preview); a split's folder and files are created with its first tile.
    """

    def __init__(self, folder: Path, planned: dict[str, int], has_hr: bool, scale: int):
        self.folder, self.planned, self.has_hr, self.scale = folder, planned, has_hr, scale
        self.count = {k: 0 for k in SPLITS}
        self._files: dict[str, dict[str, _NpyAppender]] = {}
        self._range: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._best: dict[str, TileArrays] = {}

    def add(self, which: str, tile: TileArrays) -> None:
        """Append ``tile`` to split ``which``."""
        names = [k for k in _ARRAYS if self.has_hr or not k.startswith("hr_")]
        if which not in self._files:
            (self.folder / which).mkdir()
            self._files[which] = {}
            for name in names:
                dtype, get = _ARRAYS[name]
                first = np.asarray(get(tile))
                self._files[which][name] = _NpyAppender(self.folder / which / f"{name}.npy", dtype or first.dtype,
                                                        first.shape, self.planned[which])
        stored = {name: self._files[which][name].add(_ARRAYS[name][1](tile)) for name in names}
        fitted = stored["hr_counts"] if self.has_hr else stored["lr_counts"]
        top, low = fitted.max(axis=(1, 2)), fitted.min(axis=(1, 2))
        if which in self._range:
            top, low = np.maximum(self._range[which][0], top), np.minimum(self._range[which][1], low)
        self._range[which] = (top, low)
        if which not in self._best or tile.n_transcripts > self._best[which].n_transcripts:
            self._best[which] = tile
        self.count[which] += 1

    def close(self, complete: bool = True) -> None:
        """Finish every file (its final header); with ``complete=False`` (after an error) only close them."""
        for files in self._files.values():
            for appender in files.values():
                appender.close(complete)

    def normaliser(self, which: str, genes: list[str]) -> LogScaleNormaliser:
        """Fit the normaliser on split ``which`` from its running per-gene maxima and minima.

        The same as fitting on the stacked counts: the fit takes the per-gene maximum (and checks the
        values), and dividing LR counts by s² before or after taking the maximum gives the same float32.
        """
        if which not in self._range:
            return LogScaleNormaliser.fit(np.zeros((0, len(genes), 1, 1), np.float32), genes)
        top, low = self._range[which]
        values = np.stack([top, low])[:, :, None, None]
        return LogScaleNormaliser.fit(values if self.has_hr else values / float(self.scale**2), genes)

    def best_tile(self) -> TileArrays:
        """Return the tile with the most counts, the first one in split order (train, val, test) on ties."""
        best = None
        for which in SPLITS:
            tile = self._best.get(which)
            if tile is not None and (best is None or tile.n_transcripts > best.n_transcripts):
                best = tile
        return best


def is_prepared_dataset(path: Path) -> bool:
    """Tell whether ``path`` is a folder that Diff-ST prepared and that holds nothing else.

    Replacing such a folder loses nothing of the user's.
    """
    meta_file = path / "dataset.json"
    if not path.is_dir() or not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != "diffst-prepared":
        return False
    extra = sorted(p.name for p in path.iterdir() if p.name not in DATASET_ENTRIES)
    if extra:
        log.warning("%s is a prepared dataset but also holds %s, which Diff-ST did not write", path, extra[:5])
        return False
    return True


def _check_self_supervised(samples: Sequence[Sample], geometry: TileGeometry, bin_name: str = "hr_bin_um",
                           mode: str = "self_supervised") -> None:
    """Check that samples and geometry fit the self-supervised mode (spot data, HR bin = spot pitch).

    With ``bin_name="lr_bin_um"`` the same for the sub-spot mode (LR bin = spot pitch).
    """
    from diffst.core.geometry import spot_pitch_um

    points = [s.name for s in samples if s.has_points]
    if points:
        raise InputError(f"{mode} is for spot-only slides (Visium, legacy ST), but sample(s) {points} hold "
                         "transcripts, whose binned counts are HR ground truth already. Prepare them without it.")
    for s in samples:
        pitch = spot_pitch_um(s.spots.xy_um)
        size = getattr(geometry, bin_name)
        if abs(size / pitch - 1) > 0.1:
            fix = ("spot_pitch_geometry(samples, scale) (the CLI does so with --self-supervised)" if mode ==
                   "self_supervised" else "sub_spot_geometry(training geometry) (the CLI does so with --sub-spot)")
            raise GeometryError(
                f"{mode} tiles put one spot per {bin_name[:2].upper()} bin, but that bin is {size:g} µm and the "
                f"spots of sample {s.name} are {pitch:g} µm apart. Use {fix}, or a {bin_name} equal to the pitch.")


def _check_no_leak(rows: list[dict]) -> None:
    """No training tile may share area with a held-out tile of the same sample."""
    def boxes(which: str) -> list[tuple[str, Rect]]:
        return [(r["sample"], (r["x0_um"], r["y0_um"], r["x1_um"], r["y1_um"])) for r in rows if r["split"] == which]

    held_out = boxes("val") + boxes("test")
    for name, box in boxes("train"):
        for other, held in held_out:
            if name == other and intersects(box, held):
                raise AssertionError(f"Training tile {box} overlaps held-out tile {held} of {name}: split bug.")


def load_meta(path: str | Path) -> dict:
    """Read and check ``dataset.json`` of a prepared dataset."""
    path = Path(path)
    meta_file = path / "dataset.json"
    if not meta_file.exists():
        raise InputError(f"{path} is not a prepared Diff-ST dataset (no dataset.json); run `diffst prepare` first.")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{meta_file} is corrupt ({exc}); prepare the dataset again.") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{meta_file} is not a dataset description (a JSON object); prepare the dataset again.")
    if meta.get("format") != "diffst-prepared" or meta.get("format_version") not in READABLE_VERSIONS:
        raise InputError(
            f"{meta_file} has format {meta.get('format')} v{meta.get('format_version')}; this Diff-ST reads "
            f"diffst-prepared v{', v'.join(map(str, READABLE_VERSIONS))}. Prepare the dataset again with this version."
        )
    return meta
