"""From a Sample to registered tiles.

HR maps by binning, LR maps by block sums or rasterised spots, and the tile's histology as a
tissue-level image plus cell-level patches with their entropy.

Self-supervised mode on spot-only slides (:func:`tile_spots_as_hr`): the spots themselves are the HR
ground truth, one HR bin per spot pitch (see :func:`diffst.core.geometry.spot_pitch_geometry`). Each
spot goes to the HR bin holding its centre; a bin that holds two spot centres (on Visium's hexagonal
array with square bins of one pitch, rows are 0.87 pitch apart, so about one bin in seven does) gets
their *mean*, so every measured bin is one spot's worth of tissue and no bin looks twice as bright;
bins without a spot are masked (``hr_mask`` False). LR = s x s block sums of the HR bins, for
blocks whose s² bins are all measured; other blocks are unmeasured (``lr_mask`` False, LR 0), as an
LR bin without a spot is in the ordinary spot mode, because a partial sum would under-count the block
and teach the model to share out a total that is too small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffst.core.curriculum import patch_entropy
from diffst.core.geometry import TileGeometry
from diffst.core.image import resample_area
from diffst.core.sample import Sample
from diffst.errors import GeometryError, InputError


def bin_points(
    gene: np.ndarray, x_um: np.ndarray, y_um: np.ndarray, n_genes: int, origin_um: tuple[float, float],
    bin_um: float, shape: tuple[int, int],
) -> np.ndarray:
    """Count points per gene in a grid of square bins.

    Returns float32 (n_genes, rows, cols); points outside the grid are ignored. A point on a bin's
    left/top edge belongs to that bin (half-open intervals), so adjacent grids never count it twice.
    Coordinates stored as float32 (as :func:`diffst.io.read_xenium` keeps them) are binned in float64,
    so a point lands in the same bin whatever precision it is stored in.
    """
    rows, cols = shape
    col = np.floor((np.asarray(x_um, dtype=np.float64) - origin_um[0]) / bin_um).astype(np.int64)
    row = np.floor((np.asarray(y_um, dtype=np.float64) - origin_um[1]) / bin_um).astype(np.int64)
    inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    flat = (gene[inside].astype(np.int64) * rows + row[inside]) * cols + col[inside]
    counts = np.bincount(flat, minlength=n_genes * rows * cols)
    return counts.reshape(n_genes, rows, cols).astype(np.float32)


def block_sum(hr: np.ndarray, scale: int) -> np.ndarray:
    """Sum each s x s block of the last two axes: what a spot platform with s-times coarser bins measures."""
    *lead, rows, cols = hr.shape
    if rows % scale or cols % scale:
        raise GeometryError(f"HR map {rows} x {cols} is not divisible by the scale factor {scale}.")
    return hr.reshape(*lead, rows // scale, scale, cols // scale, scale).sum(axis=(-3, -1))


@dataclass
class TileArrays:
    """All modalities of one tile (counts are raw, images uint8)."""

    geometry: TileGeometry
    lr_counts: np.ndarray  # (N, tile_lr, tile_lr)
    lr_mask: np.ndarray  # (tile_lr, tile_lr) bool: LR bins that were measured
    hr_counts: np.ndarray | None  # (N, tile_hr, tile_hr), None for spot-only data
    tissue: np.ndarray  # (C, tissue_px, tissue_px) uint8
    cells: np.ndarray  # (M, C, cell_px, cell_px) uint8
    cell_entropy: np.ndarray  # (M,) float32
    tissue_fraction: float
    n_transcripts: int
    hr_mask: np.ndarray | None = None  # (tile_hr, tile_hr) bool: HR bins that were measured; None: all (or no HR)

    def measured_hr(self) -> np.ndarray | None:
        """Return the HR mask to store: ``hr_mask``, all True for point data, None without HR."""
        if self.hr_counts is None:
            return None
        if self.hr_mask is None:
            return np.ones(self.hr_counts.shape[-2:], dtype=bool)
        return self.hr_mask


class PointIndex:
    """A sample's transcripts grouped in horizontal bands, so a tile reads only the bands it spans.

    Without it every tile scans every transcript of the slide (tiles x transcripts work); with it, the
    transcripts of the bands that the tile's rows (with a 1 µm margin) touch. A copy of the columns
    (10 bytes per transcript with float32 coordinates) made once per
    :func:`~diffst.data.prepare.prepare_dataset` call, ``chunk_rows`` transcripts at a time (a counting sort
    by band: no slide-sized index array, whose int64 alone would take 8 bytes per transcript); counts are the
    same, since :func:`bin_points` still decides which bin, if any, each transcript of the bands falls in.
    """

    def __init__(self, sample: Sample, band_um: float = 8.0, chunk_rows: int = 1 << 16):
        tx = sample.transcripts
        x, y, gene = tx["x_um"].to_numpy(), tx["y_um"].to_numpy(), tx["gene"].to_numpy()
        self.band_um = float(band_um)
        self.y_min = float(y.min()) if len(y) else 0.0
        n_bands = int(self._band_of(np.asarray([y.max()]))[0]) + 1 if len(y) else 1
        chunks = [slice(start, start + chunk_rows) for start in range(0, len(y), chunk_rows)]
        per_band = np.zeros(n_bands, dtype=np.int64)
        for rows in chunks:
            per_band += np.bincount(self._band_of(y[rows]), minlength=n_bands)
        #: Rows of band b: starts[b]:starts[b + 1].
        self.starts = np.concatenate([[0], np.cumsum(per_band)])
        self.x, self.y, self.gene = np.empty_like(x), np.empty_like(y), np.empty_like(gene)
        filled = self.starts[:-1].copy()  # next free row of each band
        for rows in chunks:
            band = self._band_of(y[rows])
            order = np.argsort(band, kind="stable")  # a chunk's rows by band, in their order within each band
            ranked = band[order]
            where = filled[ranked] + np.arange(len(ranked)) - np.searchsorted(ranked, ranked, side="left")
            self.x[where], self.y[where], self.gene[where] = x[rows][order], y[rows][order], gene[rows][order]
            filled += np.bincount(band, minlength=n_bands)

    def _band_of(self, y: np.ndarray) -> np.ndarray:
        return np.floor((np.asarray(y, dtype=np.float64) - self.y_min) / self.band_um).astype(np.int64)

    def band(self, y0_um: float, y1_um: float) -> slice:
        """Rows of the bands that hold every y in [y0_um - 1, y1_um + 1) (a 1 µm margin whatever the precision)."""
        n_bands = len(self.starts) - 1
        lo, hi = np.clip(self._band_of(np.array([y0_um - 1.0, y1_um + 1.0])), 0, n_bands - 1)
        if y1_um + 1.0 < self.y_min:
            return slice(0, 0)
        return slice(int(self.starts[lo]), int(self.starts[hi + 1]))


def tile_expression(sample: Sample, gene_idx: np.ndarray, geom: TileGeometry, average_spots: bool = False,
                    index: PointIndex | None = None):
    """HR and LR counts of the selected genes in a placed tile.

    Point data: HR = binned transcripts, LR = s x s block sums of HR (pseudo-spots); ``index`` (a
    :class:`PointIndex` of the sample) only makes it faster.
    Spot data: no HR; LR = counts of the spots whose centres fall in each LR bin (their sum, or with
    ``average_spots`` their mean: LR bins of one spot pitch, as for the sub-spot map of a self-supervised
    model, where a hexagonal array puts two centres in some bins), with a mask of the bins that hold a spot.
    """
    x0, y0, _, y1 = geom.bounds_um()
    n = len(gene_idx)
    if sample.has_points:
        if index is None:
            tx = sample.transcripts
            gene, x, y = tx["gene"].to_numpy(), tx["x_um"].to_numpy(), tx["y_um"].to_numpy()
        else:
            rows = index.band(y0, y1)
            gene, x, y = index.gene[rows], index.x[rows], index.y[rows]
        remap = np.full(len(sample.genes), -1, dtype=np.int64)
        remap[gene_idx] = np.arange(n)
        codes = remap[gene]
        keep = codes >= 0
        hr = bin_points(codes[keep], x[keep], y[keep], n, (x0, y0), geom.hr_bin_um, (geom.tile_hr, geom.tile_hr))
        lr = block_sum(hr, geom.scale)
        return hr, lr, np.ones((geom.tile_lr, geom.tile_lr), dtype=bool)
    spots = sample.spots
    xy = spots.xy_um
    col = np.floor((xy[:, 0] - x0) / geom.lr_bin_um).astype(np.int64)
    row = np.floor((xy[:, 1] - y0) / geom.lr_bin_um).astype(np.int64)
    inside = np.flatnonzero((col >= 0) & (col < geom.tile_lr) & (row >= 0) & (row < geom.tile_lr))
    lr = np.zeros((n, geom.tile_lr, geom.tile_lr), dtype=np.float32)
    mask = np.zeros((geom.tile_lr, geom.tile_lr), dtype=bool)
    if len(inside):
        sub = spots.counts[inside][:, gene_idx].toarray().astype(np.float32)
        np.add.at(lr, (slice(None), row[inside], col[inside]), sub.T)
        mask[row[inside], col[inside]] = True
        if average_spots:
            per_bin = np.zeros(mask.shape, dtype=np.float32)
            np.add.at(per_bin, (row[inside], col[inside]), 1.0)
            lr /= np.maximum(per_bin, 1.0)
    return None, lr, mask


def block_all(mask: np.ndarray, scale: int) -> np.ndarray:
    """Whether every bin of each s x s block of the last two axes is True (a block fully measured)."""
    *lead, rows, cols = mask.shape
    if rows % scale or cols % scale:
        raise GeometryError(f"HR mask {rows} x {cols} is not divisible by the scale factor {scale}.")
    return mask.reshape(*lead, rows // scale, scale, cols // scale, scale).all(axis=(-3, -1))


def tile_spots_as_hr(sample: Sample, gene_idx: np.ndarray, geom: TileGeometry):
    """HR, LR and their masks of a placed tile in the self-supervised mode (spots as HR ground truth).

    Each spot whose centre falls in the tile goes to the HR bin holding that centre; a bin holding several
    spot centres gets their mean. LR is the s x s block sum of HR where all s² bins of the block are
    measured, 0 and unmeasured elsewhere (see the module docstring).

    Parameters
    ----------
    sample
        A spot sample (``sample.spots``).
    gene_idx
        Columns of the genes to keep, in order.
    geom
        The placed tile; ``geom.hr_bin_um`` should be the spot pitch
        (:func:`~diffst.core.geometry.spot_pitch_geometry`).

    Returns
    -------
    tuple of np.ndarray
        ``(hr, lr, lr_mask, hr_mask)``: float32 (N, H, H) counts per HR bin, float32 (N, h, h) LR counts,
        bool (h, h) and bool (H, H).
    """
    if sample.spots is None:
        raise InputError(f"Sample {sample.name} holds transcripts; the self-supervised mode tiles spot data only.")
    x0, y0, _, _ = geom.bounds_um()
    n, side = len(gene_idx), geom.tile_hr
    xy = sample.spots.xy_um
    col = np.floor((xy[:, 0] - x0) / geom.hr_bin_um).astype(np.int64)
    row = np.floor((xy[:, 1] - y0) / geom.hr_bin_um).astype(np.int64)
    inside = np.flatnonzero((col >= 0) & (col < side) & (row >= 0) & (row < side))
    total = np.zeros((n, side, side), dtype=np.float64)
    spots = np.zeros((side, side), dtype=np.int64)
    if len(inside):
        sub = sample.spots.counts[inside][:, gene_idx].toarray().astype(np.float64)
        np.add.at(total, (slice(None), row[inside], col[inside]), sub.T)
        np.add.at(spots, (row[inside], col[inside]), 1)
    hr_mask = spots > 0
    hr = (total / np.maximum(spots, 1)).astype(np.float32)
    lr_mask = block_all(hr_mask, geom.scale)
    lr = np.where(lr_mask, block_sum(hr, geom.scale), 0.0).astype(np.float32)
    return hr, lr, lr_mask, hr_mask


def tile_histology(sample: Sample, geom: TileGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tissue-level image, cell-level patches, patch entropies and the full-resolution tile image.

    The tile is resampled to ``geom.image_pixel_um``; the tissue-level image is that, shrunk to
    ``tissue_px``; the cell patches cut it into ``cell_grid`` x ``cell_grid`` squares, each shrunk to
    ``cell_px``. Entropy (bits, :func:`~diffst.core.curriculum.patch_entropy`) is measured on each patch
    at full working resolution.
    """
    if sample.image is None:
        raise InputError(f"Sample {sample.name} has no image; Diff-ST needs the registered histology image.")
    x0, y0, _, _ = geom.bounds_um()
    full = sample.image.read_region_um(x0, y0, geom.tile_um, geom.tile_um, geom.image_pixel_um)  # (C, H, W)
    channels = full.shape[0]
    hwc = np.moveaxis(full, 0, -1)
    tissue = resample_area(hwc, geom.tissue_px, geom.tissue_px)
    side = full.shape[1] // geom.cell_grid
    cells = np.empty((geom.n_cell_patches, channels, geom.cell_px, geom.cell_px), dtype=np.uint8)
    entropy = np.empty(geom.n_cell_patches, dtype=np.float32)
    for k in range(geom.n_cell_patches):
        r, c = divmod(k, geom.cell_grid)
        patch = hwc[r * side : (r + 1) * side, c * side : (c + 1) * side]
        small = resample_area(patch, geom.cell_px, geom.cell_px)
        cells[k] = np.moveaxis(_to_uint8(small), -1, 0)
        entropy[k] = patch_entropy(patch)
    return np.moveaxis(_to_uint8(tissue), -1, 0), cells, entropy, full


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def foreground_fraction(full: np.ndarray, is_rgb: bool) -> float:
    """Fraction of a tile's pixels that show tissue: not white glass for H&E, signal for fluorescence."""
    if is_rgb:
        rgb = full[:3]
        saturation = rgb.max(axis=0) - rgb.min(axis=0)
        return float(((saturation > 0.06) | (rgb.mean(axis=0) < 0.75)).mean())
    return float((full.max(axis=0) > 0.05).mean())


def make_tile(sample: Sample, gene_idx: np.ndarray, geom: TileGeometry, self_supervised: bool = False,
              average_spots: bool = False, index: PointIndex | None = None) -> TileArrays:
    """All modalities of one placed tile; raises when the tile lies outside the image.

    ``self_supervised``: a spot sample's spots are the HR ground truth (:func:`tile_spots_as_hr`).
    ``average_spots``: spots sharing an LR bin give their mean (:func:`tile_expression`).
    ``index``: the sample's :class:`PointIndex`, for point data cut into many tiles (same result, faster).
    """
    x0, y0, x1, y1 = geom.bounds_um()
    ix0, iy0, ix1, iy1 = sample.image.extent_um()
    tol = sample.image.pixel_size_um
    if x0 < ix0 - tol or y0 < iy0 - tol or x1 > ix1 + tol or y1 > iy1 + tol:
        raise GeometryError(
            f"Tile x {x0:.1f}-{x1:.1f} µm, y {y0:.1f}-{y1:.1f} µm of sample {sample.name} extends beyond its image "
            f"(x {ix0:.1f}-{ix1:.1f}, y {iy0:.1f}-{iy1:.1f} µm). Place tiles inside the image."
        )
    hr_mask = None
    if self_supervised:
        hr, lr, mask, hr_mask = tile_spots_as_hr(sample, gene_idx, geom)
    else:
        hr, lr, mask = tile_expression(sample, gene_idx, geom, average_spots, index)
    tissue, cells, entropy, full = tile_histology(sample, geom)
    if hr is not None:
        occupied = (hr.sum(axis=0) > 0).mean()
        fraction = float(max(occupied, foreground_fraction(full, sample.image.is_rgb)))
        n_tx = int(round(float(hr.sum())))
    else:
        fraction = foreground_fraction(full, sample.image.is_rgb)
        n_tx = int(lr.sum())
    return TileArrays(geom, lr, mask, hr, tissue, cells, entropy, fraction, n_tx, hr_mask)


def plan_origins(
    region_um: tuple[float, float, float, float], geom: TileGeometry, stride_um: float
) -> list[tuple[float, float]]:
    """Top-left corners of tiles that fit inside ``region_um`` (x0, y0, x1, y1) at ``stride_um``.

    A last row / column is added as close to the far edges as the HR grid allows (within one HR bin).
    """
    x0, y0, x1, y1 = region_um
    size = geom.tile_um
    if x1 - x0 < size - 1e-6 or y1 - y0 < size - 1e-6:
        raise GeometryError(
            f"Region {x1 - x0:.0f} x {y1 - y0:.0f} µm is smaller than one tile ({size:g} µm). "
            "Use a smaller tile preset (e.g. --preset cpu) or a larger region."
        )
    if stride_um <= 0:
        raise GeometryError(f"Tile stride must be positive microns, got {stride_um}.")
    if abs(stride_um / geom.hr_bin_um - round(stride_um / geom.hr_bin_um)) > 1e-6:
        raise GeometryError(
            f"Tile stride {stride_um:g} µm is not a multiple of the HR bin ({geom.hr_bin_um:g} µm); overlapping tiles "
            "would not share bins. Use a multiple of the HR bin."
        )

    def starts(lo: float, hi: float) -> list[float]:
        values = list(np.arange(lo, hi - size + 1e-6, stride_um))
        # The flush tile snaps to the HR grid anchored at lo, so overlapping tiles share bins.
        last = lo + np.floor((hi - size - lo) / geom.hr_bin_um + 1e-9) * geom.hr_bin_um
        if last - values[-1] > 1e-6:
            values.append(last)
        return [float(v) for v in values]

    return [(x, y) for y in starts(y0, y1) for x in starts(x0, x1)]


def intersects(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether two (x0, y0, x1, y1) rectangles share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
