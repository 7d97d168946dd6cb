"""The histology behind a prediction, rebuilt from the tile images of a prepared dataset.

A prepared dataset keeps no copy of the slide image, only each tile's tissue-level image
(``<split>/tissue.npy``, ``tissue_px`` pixels over ``tile_um`` microns). Those tiles are pasted into one
mosaic in the slide's micron frame (:func:`mosaic_tiles`) and, for scanpy / squidpy, resampled into the
full-resolution image's pixel frame at a reduced scale (:func:`hires_image`), the way Space Ranger's
``tissue_hires_image.png`` relates to ``obsm['spatial']`` through ``tissue_hires_scalef``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffst.errors import InputError

# Space Ranger's hires image has a longest side of 2000 px; scanpy and squidpy expect about that.
HIRES_MAX_SIDE = 2000


@dataclass
class HistologyMosaic:
    """Histology of a region in the slide's micron frame.

    Attributes
    ----------
    image
        (H, W, C) uint8; pixel (0, 0) has its top-left corner at (``x0_um``, ``y0_um``).
    x0_um, y0_um
        Micron coordinates of the mosaic's top-left corner.
    um_per_px
        Side of one mosaic pixel in microns.
    covered
        (H, W) bool: pixels that some tile covers (the rest is background).
    """

    image: np.ndarray
    x0_um: float
    y0_um: float
    um_per_px: float
    covered: np.ndarray

    @property
    def is_rgb(self) -> bool:
        """Whether the image is RGB (H&E) rather than 1..k fluorescence channels."""
        return self.image.shape[2] == 3

    def extent_um(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the mosaic in microns."""
        h, w = self.image.shape[:2]
        return self.x0_um, self.y0_um, self.x0_um + w * self.um_per_px, self.y0_um + h * self.um_per_px


def background_value(n_channels: int) -> int:
    """Value of pixels no tile covers: white glass for RGB H&E, black for fluorescence."""
    return 255 if n_channels == 3 else 0


@dataclass
class TilePlacement:
    """Where tile images land in a mosaic at their own pixel size: corners rounded to whole mosaic pixels.

    ``rows`` / ``cols`` (T,) are each tile's top-left pixel, ``side`` its pixels a side, ``height`` x ``width``
    the mosaic; its pixel (0, 0) has its corner at (``x0_um``, ``y0_um``), ``um_per_px`` microns a side.
    """

    rows: np.ndarray
    cols: np.ndarray
    side: int
    height: int
    width: int
    x0_um: float
    y0_um: float
    um_per_px: float


def place_tiles(n_tiles: int, side: int, x0_um: np.ndarray, y0_um: np.ndarray, tile_um: float) -> TilePlacement:
    """Place ``n_tiles`` tile images of ``side`` pixels (top-left corners in µm) in one mosaic.

    Raises
    ------
    InputError
        When there are no tiles.
    """
    if n_tiles == 0:
        raise InputError("No tiles to build the histology mosaic from; the split holds no tiles.")
    um_per_px = tile_um / side
    gx0, gy0 = float(np.min(x0_um)), float(np.min(y0_um))
    cols = np.round((np.asarray(x0_um) - gx0) / um_per_px).astype(int)
    rows = np.round((np.asarray(y0_um) - gy0) / um_per_px).astype(int)
    return TilePlacement(rows, cols, int(side), int(rows.max()) + side, int(cols.max()) + side, gx0, gy0, um_per_px)


def paste_window(tissue, order: np.ndarray, place: TilePlacement, top: int, bottom: int, left: int,
                 right: int) -> tuple[np.ndarray, np.ndarray]:
    """Average the tile images over mosaic rows ``top:bottom`` and columns ``left:right``.

    Tile ``j`` of ``place`` is ``tissue[order[j]]`` ((C, S, S) uint8; a memory map is read one tile, and
    only the part inside the window, at a time). Tiles are added in their order, so a pixel's float32 sum is
    the same whatever window it is computed in.

    Returns
    -------
    tuple
        ``(image, covered)``: (C, h, w) uint8 (background where no tile is, :func:`background_value`) and
        (h, w) bool.
    """
    rows, cols, side = place.rows, place.cols, place.side
    channels = int(tissue.shape[1])
    total = np.zeros((channels, bottom - top, right - left), np.float32)
    count = np.zeros((bottom - top, right - left), np.float32)
    for j in np.flatnonzero((rows < bottom) & (rows + side > top) & (cols < right) & (cols + side > left)):
        r0, r1 = max(rows[j], top), min(rows[j] + side, bottom)
        c0, c1 = max(cols[j], left), min(cols[j] + side, right)
        part = np.asarray(tissue[int(order[j])][:, r0 - rows[j] : r1 - rows[j], c0 - cols[j] : c1 - cols[j]])
        total[:, r0 - top : r1 - top, c0 - left : c1 - left] += part
        count[r0 - top : r1 - top, c0 - left : c1 - left] += 1
    # In place: a window's temporaries are what bounds a streamed writer's memory.
    covered = count > 0
    np.divide(total, count, out=total, where=covered)
    np.clip(np.round(total, out=total), 0, 255, out=total)
    image = total.astype(np.uint8)
    image[:, ~covered] = background_value(channels)
    return image, covered


def mosaic_tiles(tissue: np.ndarray, x0_um: np.ndarray, y0_um: np.ndarray, tile_um: float) -> HistologyMosaic:
    """Paste tile images into one mosaic, averaging where tiles overlap.

    Parameters
    ----------
    tissue
        (T, C, S, S) uint8 tile images (a memory map is read one tile at a time).
    x0_um, y0_um
        (T,) top-left corner of each tile in microns.
    tile_um
        Side of a tile in microns (the S pixels span it).

    Returns
    -------
    HistologyMosaic
        At ``tile_um / S`` microns per pixel. Tile corners are rounded to the nearest mosaic pixel (tiles sit
        on the HR grid, which need not be a whole number of mosaic pixels), so a tile may be off by up to
        half a pixel.
    """
    place = place_tiles(tissue.shape[0], tissue.shape[2], x0_um, y0_um, tile_um)
    image, covered = paste_window(tissue, np.arange(tissue.shape[0]), place, 0, place.height, 0, place.width)
    return HistologyMosaic(np.moveaxis(image, 0, -1), place.x0_um, place.y0_um, place.um_per_px, covered)


def display_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 for display: RGB as it is; one fluorescence channel (or the first of several) as grey.

    scanpy and squidpy show a 2-D image through a colour map, so grey is made explicit as RGB.
    """
    if image.shape[2] == 3:
        return image
    return np.repeat(image[..., :1], 3, axis=2)


def full_resolution_extent(extent_um: tuple[float, float, float, float], um_to_px: np.ndarray,
                           ) -> tuple[float, float, float]:
    """Place a micron rectangle in the full-resolution image: its far corner and the image's pixel size.

    Returns
    -------
    tuple
        ``(far_x, far_y, full_px_um)``: the largest full-resolution pixel coordinates of the rectangle's
        corners and the microns per full-resolution pixel.

    Raises
    ------
    InputError
        If the rectangle lies at negative pixel coordinates (a wrong image placement).
    """
    um_to_px = np.asarray(um_to_px, float)
    x0, y0, x1, y1 = extent_um
    corners_px = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]]) @ um_to_px.T
    far_x, far_y = corners_px[:, 0].max(), corners_px[:, 1].max()
    if not (far_x > 0 and far_y > 0):
        raise InputError(f"The predicted region ({x0:.0f}-{x1:.0f} x {y0:.0f}-{y1:.0f} µm) lies outside its sample's "
                         "image (negative pixel coordinates); the sample's image placement (um_to_px) is wrong.")
    return float(far_x), float(far_y), float(np.sqrt(abs(np.linalg.det(um_to_px[:2, :2])))) ** -1


def hires_image(mosaic: HistologyMosaic, um_to_px: np.ndarray, max_side: int = HIRES_MAX_SIDE, *,
                strip_rows: int = 32, hold_edges: bool = False) -> tuple[np.ndarray, float]:
    """Resample a mosaic into the full-resolution image's pixel frame, scaled down, for ``uns['spatial']``.

    The result covers full-resolution pixels from (0, 0) to the far corner of the mosaic, so that a bin at
    ``obsm['spatial']`` (full-resolution pixels) lies at ``obsm['spatial'] * scalef`` in it, as scanpy and
    squidpy assume; any affine placement (rotation, flip) of the slide image is honoured. It is resampled
    ``strip_rows`` rows at a time, so no full-size temporaries are made.

    Parameters
    ----------
    mosaic
        The histology in microns.
    um_to_px
        (3, 3) affine map from slide microns to full-resolution image pixels (the sample's ``um_to_px``).
    max_side
        Longest side of the result in pixels; it is never finer than the mosaic itself.
    strip_rows
        Rows of the result resampled at a time; the temporaries take ~150 bytes per pixel of a strip (32 rows
        of a 2000-pixel-wide image: ~10 MB).
    hold_edges
        Hires pixels within half a mosaic pixel of the mosaic's outer edge take the edge pixel's value
        instead of fading into the background (for a mosaic coarser than its tiles' images).

    Returns
    -------
    tuple
        ``(image, scalef)``: (H, W, 3) uint8 RGB (:func:`display_rgb`) and ``tissue_hires_scalef``, the
        hires pixels per full-resolution pixel.
    """
    from scipy.ndimage import map_coordinates

    um_to_px = np.asarray(um_to_px, float)
    far_x, far_y, full_px_um = full_resolution_extent(mosaic.extent_um(), um_to_px)
    # No finer than the mosaic (upsampling adds nothing), and no larger than max_side.
    scalef = min(max_side / max(far_x, far_y), full_px_um / mosaic.um_per_px)
    width, height = max(1, int(np.ceil(far_x * scalef))), max(1, int(np.ceil(far_y * scalef)))
    inverse = np.linalg.inv(um_to_px)
    background = float(background_value(mosaic.image.shape[2]))
    # The display channels (grey shown as RGB: one plane, copied); uint8 planes are interpolated in double
    # precision as float32 ones would be, without a float copy of the mosaic.
    grey = mosaic.image.shape[2] != 3  # display_rgb shows the first channel as grey
    planes = [np.ascontiguousarray(mosaic.image[..., ch]) for ch in range(1 if grey else 3)]
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, strip_rows):
        bottom = min(top + strip_rows, height)
        # Centre of each hires pixel -> full-resolution pixel -> microns -> mosaic pixel (centre-based indices).
        cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(top, bottom) + 0.5)
        px = np.stack([cols.ravel() / scalef, rows.ravel() / scalef, np.ones(cols.size)])
        um = inverse @ px
        mx = (um[0] - mosaic.x0_um) / mosaic.um_per_px - 0.5
        my = (um[1] - mosaic.y0_um) / mosaic.um_per_px - 0.5
        if hold_edges:
            for coord, n in ((mx, mosaic.image.shape[1]), (my, mosaic.image.shape[0])):
                rim = (coord >= -0.5) & (coord <= n - 0.5)
                coord[rim] = np.clip(coord[rim], 0, n - 1)
        for ch, plane in enumerate(planes):
            values = map_coordinates(plane, [my, mx], output=np.float64, order=1, mode="constant", cval=background)
            strip = np.clip(np.round(values), 0, 255).astype(np.uint8).reshape(bottom - top, width)
            for target in ((0, 1, 2) if grey else (ch,)):
                out[top:bottom, :, target] = strip
    return out, float(scalef)
