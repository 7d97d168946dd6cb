"""Tile geometry in microns: one object says where a tile is and how every modality is gridded.

A tile is a square of ``tile_lr`` low-resolution (LR) bins per side. Each LR bin is ``scale x scale``
high-resolution (HR) bins, so HR = LR x scale exactly and the LR map of a tile is the s x s block
sum of its HR map (Xenium pseudo-spots). The histology of the tile is resampled to
``image_pixel_um`` and then shrunk to a ``tissue_px``-square tissue-level image, and cut into a
``cell_grid x cell_grid`` grid of cell-level patches stored at ``cell_px`` pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from diffst.errors import GeometryError, InputError

if TYPE_CHECKING:
    from diffst.core.sample import Sample


@dataclass(frozen=True)
class TileGeometry:
    """Gridding of one tile, in microns. Validated on construction.

    Attributes
    ----------
    hr_bin_um
        Side of one HR bin (the output resolution), e.g. 10 µm.
    scale
        Super-resolution factor s: an LR bin is s x s HR bins (5 or 10 in the paper).
    tile_lr
        LR bins per tile side; the tile is ``tile_lr * scale * hr_bin_um`` microns wide.
    image_pixel_um
        Microns per pixel the histology is resampled to before cutting (paper: 0.5).
    tissue_px
        Side of the tissue-level image (paper: 256).
    cell_grid
        Cell-level patches per side (paper: 16, so M = 256 patches).
    cell_px
        Stored side of each cell-level patch (paper code: 16).
    origin_um
        (x, y) micron coordinates of the tile's top-left corner; None for a template.
    """

    hr_bin_um: float
    scale: int
    tile_lr: int
    image_pixel_um: float = 0.5
    tissue_px: int = 256
    cell_grid: int = 16
    cell_px: int = 16
    origin_um: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.origin_um is not None:
            object.__setattr__(self, "origin_um", (float(self.origin_um[0]), float(self.origin_um[1])))
        if not self.hr_bin_um > 0:
            raise GeometryError(f"hr_bin_um must be a positive size in microns, got {self.hr_bin_um}.")
        if self.scale < 1:
            raise GeometryError(f"scale (super-resolution factor s) must be >= 1, got {self.scale}; use 5 or 10.")
        if self.tile_lr < 1:
            raise GeometryError(f"tile_lr (LR bins per tile side) must be >= 1, got {self.tile_lr}.")
        if not self.image_pixel_um > 0:
            raise GeometryError(f"image_pixel_um must be positive microns per pixel, got {self.image_pixel_um}.")
        if self.image_pixel_um > self.hr_bin_um:
            raise GeometryError(
                f"image_pixel_um={self.image_pixel_um} is coarser than the HR bin ({self.hr_bin_um} µm): the image "
                "would hold less detail than the output. Use a finer image pixel size (e.g. 0.5 µm)."
            )
        if self.image_px < self.tissue_px:
            raise GeometryError(
                f"The tile is only {self.image_px} px at {self.image_pixel_um} µm/px, smaller than the tissue-level "
                f"image ({self.tissue_px} px). Lower tissue_px or use a finer image_pixel_um."
            )
        if self.cell_grid < 1 or self.image_px // self.cell_grid < 1:
            raise GeometryError(f"cell_grid={self.cell_grid} patches per side do not fit a {self.image_px} px tile.")

    # -------------------------------------------------------------------------------- derived sizes
    @property
    def lr_bin_um(self) -> float:
        """Side of one LR bin in microns (``scale`` HR bins)."""
        return self.hr_bin_um * self.scale

    @property
    def tile_um(self) -> float:
        """Side of the tile in microns."""
        return self.tile_lr * self.lr_bin_um

    @property
    def tile_hr(self) -> int:
        """HR bins per tile side."""
        return self.tile_lr * self.scale

    @property
    def image_px(self) -> int:
        """Pixels per tile side at ``image_pixel_um``."""
        return int(round(self.tile_um / self.image_pixel_um))

    @property
    def n_cell_patches(self) -> int:
        """Number M of cell-level patches (``cell_grid`` squared)."""
        return self.cell_grid * self.cell_grid

    @property
    def cell_patch_um(self) -> float:
        """Side of one cell-level patch in microns."""
        return self.tile_um / self.cell_grid

    def at(self, x_um: float, y_um: float) -> TileGeometry:
        """Return the same gridding placed with its top-left corner at (x_um, y_um)."""
        return replace(self, origin_um=(float(x_um), float(y_um)))

    def to_dict(self, with_origin: bool = False) -> dict:
        """Plain dict for JSON; ``TileGeometry(**d)`` restores it."""
        d = asdict(self)
        if not with_origin:
            d.pop("origin_um")
        return d

    def bounds_um(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of a placed tile."""
        if self.origin_um is None:
            raise GeometryError("This geometry is a template without origin_um; place it with .at(x, y) first.")
        x0, y0 = self.origin_um
        return x0, y0, x0 + self.tile_um, y0 + self.tile_um

    def describe(self) -> str:
        """One line naming every size of the gridding, for logs and errors."""
        return (
            f"tile {self.tile_um:g} µm: LR {self.tile_lr}x{self.tile_lr} at {self.lr_bin_um:g} µm, "
            f"HR {self.tile_hr}x{self.tile_hr} at {self.hr_bin_um:g} µm (s={self.scale}), image "
            f"{self.image_px} px at {self.image_pixel_um:g} µm/px -> tissue {self.tissue_px}^2, "
            f"{self.n_cell_patches} cell patches of {self.cell_patch_um:g} µm"
        )


PresetName = Literal["paper", "cpu"]


def tile_preset(name: PresetName, scale: int = 10) -> TileGeometry:
    """Named tile geometries.

    ``paper``: LR 100 µm bins, 26 x 26 per tile (2.6 mm, the paper's ~2.56 mm tiles rounded to whole
    LR bins), HR 10 µm at s = 10 or 20 µm at s = 5, image at 0.5 µm/px, tissue image 256 x 256,
    16 x 16 = 256 cell patches (162.5 µm each, the paper's "cellular organisation scale").

    ``cpu``: small tiles the real Xenium crop (510 x 382 µm) fills several times: HR 10 µm, tiles of
    200 µm (20 x 20 HR bins; LR 50 µm at s = 5, 100 µm at s = 10), image at 0.5 µm/px shrunk to
    128 x 128, 8 x 8 cell patches of 25 µm.
    """
    if scale not in (5, 10):
        raise GeometryError(f"Presets are defined for scale 5 and 10, got {scale}; build a TileGeometry directly.")
    if name == "paper":
        return TileGeometry(hr_bin_um=1000.0 / (10 * scale), scale=scale, tile_lr=26, image_pixel_um=0.5,
                            tissue_px=256, cell_grid=16, cell_px=16)
    if name == "cpu":
        return TileGeometry(hr_bin_um=10.0, scale=scale, tile_lr=200 // (10 * scale), image_pixel_um=0.5,
                            tissue_px=128, cell_grid=8, cell_px=16)
    raise GeometryError(f"Unknown tile preset '{name}'; choose 'paper' or 'cpu'.")


def spot_pitch_um(xy_um: np.ndarray) -> float:
    """Spot pitch of an array: the median distance from each spot to its nearest neighbour, in microns.

    On Visium's hexagonal array and on legacy ST's square one alike the nearest neighbours sit one pitch
    away, so the median is the pitch (100 and 200 µm), robust to missing spots and registration jitter.

    Parameters
    ----------
    xy_um
        (n, 2) spot centres in microns, n >= 2.

    Returns
    -------
    float
        The pitch, rounded to 0.01 µm.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 2:
        raise InputError(f"A spot pitch needs at least two spot centres (n, 2); got an array of shape {xy.shape}.")
    dist, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(dist[:, 1]))
    if not pitch > 0:
        raise GeometryError("Half or more of the spots share their centre with another spot; the spot table "
                            "holds duplicates. Drop them before deriving the pitch.")
    return round(pitch, 2)


def spot_pitch_geometry(
    samples: Sample | Sequence[Sample],
    scale: int = 2,
    tile_lr: int | None = None,
    *,
    preset: PresetName = "cpu",
    image_pixel_um: float | None = None,
) -> TileGeometry:
    """Tile geometry of the self-supervised mode on spot-only slides: one HR bin per spot pitch.

    The slide's own spots are the HR ground truth: ``hr_bin_um`` is the spot pitch (the median
    nearest-neighbour distance of the spots, :func:`spot_pitch_um`), and an LR bin is ``scale x scale``
    of those bins (``scale * pitch`` microns), so LR is the block sum of the spots. A model trained on such
    tiles learns to share a block's count out over its spots; applied to the real spots as LR (bins of one
    pitch), it gives the sub-spot map (HR bins of ``pitch / scale``).

    Parameters
    ----------
    samples
        One spot sample or several (their pitches must agree within 5 %).
    scale
        Super-resolution factor s of training (2 or 3 keeps enough blocks on a slide; any s >= 2 works).
    tile_lr
        LR bins per tile side. Default: as many as make a tile of about 16 x 16 HR bins, but no more than
        fit the smallest sample's data (at least one).
    preset
        Tile preset whose image sizes (``tissue_px``, ``cell_grid``, ``cell_px``) are used: ``cpu`` or
        ``paper``.
    image_pixel_um
        Microns per pixel the histology is resampled to before cutting. Default: the tile at twice the
        tissue image's size, ``tile_um / (2 * tissue_px)``.

    Returns
    -------
    TileGeometry
        A template (no origin) with ``hr_bin_um`` = the pitch.

    Raises
    ------
    InputError
        If a sample holds transcripts (point data have HR ground truth of their own) or fewer than two spots.
    GeometryError
        If the samples' pitches disagree, ``scale < 2``, or the data are smaller than one tile.
    """
    group = [samples] if not isinstance(samples, Sequence) else list(samples)
    if not group:
        raise InputError("spot_pitch_geometry needs at least one spot sample.")
    points = [s.name for s in group if s.has_points]
    if points:
        raise InputError(f"Sample(s) {points} hold transcripts (point data), which have HR ground truth of their own; "
                         "the self-supervised mode is for spot-only slides (Visium, legacy ST). Prepare point data "
                         "without it.")
    if int(scale) != scale or scale < 2:
        raise GeometryError(f"The self-supervised scale s must be a whole number >= 2 (LR = s x s spots), got {scale}.")
    scale = int(scale)
    pitches = {s.name: spot_pitch_um(s.spots.xy_um) for s in group}
    pitch = float(np.median(list(pitches.values())))
    if max(abs(p / pitch - 1) for p in pitches.values()) > 0.05:
        raise GeometryError(f"The samples' spot pitches differ ({pitches} µm); the self-supervised mode puts one spot "
                            "per HR bin, so prepare samples of one array type together.")
    template = tile_preset(preset, 10)
    lr_bin = scale * pitch
    if tile_lr is None:
        fit = min(min(e[2] - e[0], e[3] - e[1]) for e in (_tiling_extent(s, pitch) for s in group))
        tile_lr = int(max(1, min(max(1, 16 // scale), np.floor(fit / lr_bin + 1e-9))))
    if tile_lr < 1:
        raise GeometryError(f"tile_lr (LR bins per tile side) must be >= 1, got {tile_lr}.")
    tile_um = tile_lr * lr_bin
    pixel = image_pixel_um if image_pixel_um is not None else tile_um / (2 * template.tissue_px)
    return TileGeometry(hr_bin_um=pitch, scale=scale, tile_lr=int(tile_lr), image_pixel_um=float(pixel),
                        tissue_px=template.tissue_px, cell_grid=template.cell_grid, cell_px=template.cell_px)


def sub_spot_geometry(geometry: TileGeometry) -> TileGeometry:
    """Geometry that predicts the sub-spot map of a model trained in the self-supervised mode.

    The real spots become the LR input (LR bin = the spot pitch, the HR bin of ``geometry``) and the output
    bins are ``pitch / s``: every size of the tile, the image's working pixel included, shrinks by s, so the
    model sees the same number of bins and pixels per tile as in training (it is applied one scale finer
    than it was trained at, the assumption every self-supervised super-resolution makes).

    Parameters
    ----------
    geometry
        The self-supervised training geometry (:func:`spot_pitch_geometry`).

    Returns
    -------
    TileGeometry
        Same ``scale``, ``tile_lr`` and image sizes; ``hr_bin_um`` and ``image_pixel_um`` divided by s.
    """
    s = geometry.scale
    return replace(geometry, hr_bin_um=geometry.hr_bin_um / s, image_pixel_um=geometry.image_pixel_um / s)


def _tiling_extent(sample: Sample, pad_um: float) -> tuple[float, float, float, float]:
    """Where tiles of a sample may go: its data extent padded by ``pad_um``, cut to its image (as prepare does)."""
    dx0, dy0, dx1, dy1 = sample.extent_um()
    box = (dx0 - pad_um, dy0 - pad_um, dx1 + pad_um, dy1 + pad_um)
    if sample.image is None:
        return box
    ix0, iy0, ix1, iy1 = sample.image.extent_um()
    return max(box[0], ix0), max(box[1], iy0), min(box[2], ix1), min(box[3], iy1)
