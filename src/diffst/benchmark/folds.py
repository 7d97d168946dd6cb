"""Region folds: a sample's data extent cut into k disjoint cells that together cover it.

Each fold holds out its cell for testing, and names the cell farthest from it as its validation region
(model selection of the trained methods, used when enough training tissue is left beside both). A cell narrower than one tile (small samples, many folds) is grown
symmetrically to one tile side, clamped inside the extent, so that a test tile fits: the held-out region
then contains the cell, test tiles of neighbouring folds may overlap, and within every fold no training tile
touches the held-out region (:func:`diffst.data.prepare.prepare_dataset` guarantees that).

A sample split (:func:`sample_fold`) is the other protocol: train on some samples, test on others whole
(e.g. HER2ST sections C2 -> C3), one fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffst.core.geometry import TileGeometry
from diffst.core.sample import Sample
from diffst.errors import InputError

Rect = tuple[float, float, float, float]
LAYOUTS = ("auto", "strips", "grid")


@dataclass(frozen=True)
class Fold:
    """One fold of one sample: its cell and the rectangle held out for testing (µm, x0, y0, x1, y1).

    ``cell`` is the fold's share of the extent (cells are disjoint and cover it); ``region`` is the cell grown
    to at least one tile per side, the ``test_region`` of the fold's prepared dataset; ``val_region`` the
    farthest other cell, grown the same way (the ``val_region`` when the benchmark can afford it).
    A sample split has ``test_samples`` (held out whole), ``sample`` naming the training samples and no
    regions.
    """

    sample: str
    index: int
    k: int
    cell: Rect | None
    region: Rect | None
    val_region: Rect | None = None
    test_samples: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Folder- and file-safe name, e.g. ``xenium_breast_crop_fold0`` or ``C2_to_C3``."""
        if self.test_samples:
            return f"{self.sample}_to_{'+'.join(self.test_samples)}"
        return f"{self.sample}_fold{self.index}"


def _shape(extent: Rect, k: int, tile_um: float, layout: str) -> tuple[int, int]:
    """(rows, cols) of the fold grid: strips are (1, k); ``auto`` prefers strips when a tile fits a cell."""
    w, h = extent[2] - extent[0], extent[3] - extent[1]
    if layout == "strips":
        return 1, k
    shapes = [(r, k // r) for r in range(1, k + 1) if k % r == 0]
    if layout == "grid":
        shapes = [s for s in shapes if s[0] > 1 and s[1] > 1] or shapes
    fits = [s for s in shapes if w / s[1] >= tile_um and h / s[0] >= tile_um]
    if fits:
        return fits[0] if layout == "auto" else max(fits, key=lambda s: min(w / s[1], h / s[0]))
    return max(shapes, key=lambda s: min(w / s[1], h / s[0]) / tile_um)


def grid_regions(extent: Rect, k: int, tile_um: float, layout: str = "auto") -> list[Rect]:
    """Cut ``extent`` (x0, y0, x1, y1) into ``k`` disjoint rectangles that cover it.

    Parameters
    ----------
    extent
        The rectangle to cut, in microns.
    k
        Number of folds (at least 2).
    tile_um
        Tile side; ``auto`` picks vertical strips when a tile fits in one, else the r x c grid
        (r * c = k) whose cells fit a tile, else the grid with the squarest cells (grown to a tile later).
    layout
        ``auto``, ``strips`` (k vertical strips) or ``grid`` (r x c with r, c > 1 when k allows).

    Returns
    -------
    list of tuple
        Row-major rectangles; neighbouring rectangles share an edge and never overlap.
    """
    if k < 2:
        raise InputError(f"--folds must be at least 2, got {k}.")
    if layout not in LAYOUTS:
        raise InputError(f"Unknown fold layout '{layout}'; choose one of {list(LAYOUTS)}.")
    rows, cols = _shape(extent, k, tile_um, layout)
    x0, y0, x1, y1 = extent
    xs = [x0 + (x1 - x0) * i / cols for i in range(cols + 1)]
    ys = [y0 + (y1 - y0) * j / rows for j in range(rows + 1)]
    xs[-1], ys[-1] = x1, y1
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(rows) for i in range(cols)]


def grow_to_tile(cell: Rect, extent: Rect, tile_um: float) -> Rect:
    """Grow ``cell`` symmetrically to at least ``tile_um`` per side, shifted to stay inside ``extent``."""
    out = []
    for lo, hi, elo, ehi in ((cell[0], cell[2], extent[0], extent[2]), (cell[1], cell[3], extent[1], extent[3])):
        need = max(tile_um - (hi - lo), 0.0) / 2
        lo, hi = lo - need, hi + need
        if lo < elo:
            lo, hi = elo, hi + (elo - lo)
        if hi > ehi:
            lo, hi = max(elo, lo - (hi - ehi)), ehi
        out.append((lo, hi))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def make_folds(samples: Sequence[Sample], geometry: TileGeometry, k: int, layout: str = "auto") -> list[Fold]:
    """Cut every sample's tile region (image cut to the data extent) into k folds with :func:`grid_regions`."""
    from diffst.data.prepare import _sample_region

    folds = []
    for s in samples:
        extent = _sample_region(s, geometry)
        cells = grid_regions(extent, k, geometry.tile_um, layout)
        for i, c in enumerate(cells):
            far = max((o for o in cells if o != c), key=lambda o: _distance(o, c), default=None)
            val = None if far is None else grow_to_tile(far, extent, geometry.tile_um)
            folds.append(Fold(s.name, i, k, c, grow_to_tile(c, extent, geometry.tile_um), val))
    return folds


def _distance(a: Rect, b: Rect) -> float:
    """Distance between the centres of two rectangles."""
    return float(((a[0] + a[2] - b[0] - b[2]) ** 2 + (a[1] + a[3] - b[1] - b[3]) ** 2) ** 0.5 / 2)


def sample_fold(samples: Sequence[Sample], test_samples: Sequence[str]) -> Fold:
    """Return the fold of a sample split: train on every sample not in ``test_samples``, test on those whole."""
    names = [s.name for s in samples]
    test = list(dict.fromkeys(test_samples))
    unknown = [t for t in test if t not in names]
    if unknown:
        raise InputError(f"--test-sample {','.join(unknown)} names no sample given; the samples are {names}.")
    train = [n for n in names if n not in test]
    if not test or not train:
        raise InputError(f"A sample split needs at least one training and one test sample; got samples {names} and "
                         f"test samples {test}. Give more samples, or leave --test-sample out for region folds.")
    return Fold("+".join(train), 0, 1, None, None, None, tuple(test))
