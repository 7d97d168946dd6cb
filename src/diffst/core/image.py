"""Histology and morphology images placed in the slide's micron frame, read lazily.

An image is described by its pixels and by an affine map from slide microns to image pixels
(``um_to_px``: (x_um, y_um, 1) -> (col, row, 1)). Everything else in Diff-ST speaks microns; this is
the only place that knows about pixels. TIFF / OME-TIFF files are opened through a zarr view, so
reading a region decodes only the TIFF tiles or strips it touches. A JPEG cannot be decoded by region,
but libjpeg decodes it at 1/2, 1/4 or 1/8 of its size for a fraction of the time and memory (each pixel
of the 1/k scale is the mean of a k x k block, blocks aligned at pixel (0, 0)): a JPEG is a pyramid of
those four scales, each decoded whole on first use and kept, so a region wanted at 5 µm/px never decodes
the full-resolution image. Opening decodes only the 1/8 scale (which reads every byte of the file, so a
truncated or corrupt JPEG is refused at once).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.transform import AffineTransform, warp

from diffst.errors import GeometryError, InputError

XENIUM_PIXEL_SIZE_UM = 0.2125  # microns per pixel of a full-resolution Xenium morphology image
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf")
_PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png")


def tiff_pixel_size_um(path: str | Path) -> float | None:
    """Pixel size (µm) recorded in an OME-TIFF's metadata, or None when the file has none."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return _ome_pixel_size_um(tif.ome_metadata) if tif.is_ome else None
    except Exception as exc:
        raise InputError(f"Cannot read TIFF {path}: {exc}. The file may be truncated or not a TIFF.") from exc


def _ome_pixel_size_um(ome_xml: str | None) -> float | None:
    """Physical pixel size (µm) from OME-XML; None when absent, NaN when present but not a positive number."""
    if not ome_xml:
        return None
    match = re.search(r'PhysicalSizeX="([^"]*)"', ome_xml)
    if not match:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome_xml)
    try:
        value = float(match.group(1))
    except ValueError:
        return float("nan")
    if not (np.isfinite(value) and value > 0):
        return float("nan")
    factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm", 1.0)
    return value * factor


def positive_number(value, what: str) -> float:
    """``value`` as a positive finite float; raises GeometryError naming ``what`` (the user's keyword / flag)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (np.isfinite(number) and number > 0):
        raise GeometryError(f"{what} must be a positive number of microns per pixel, got {value!r}.")
    return number


def origin_xy(origin_um) -> tuple[float, float]:
    """``origin_um`` as two finite floats (x, y); raises GeometryError naming ``image_origin_um`` otherwise."""
    try:
        ox, oy = np.asarray(origin_um, dtype=float).reshape(2)
    except (TypeError, ValueError):
        ox = oy = float("nan")
    if not (np.isfinite(ox) and np.isfinite(oy)):
        raise GeometryError(
            f"image_origin_um (--image-origin) must be two finite numbers x, y (microns of the image's top-left "
            f"corner), got {origin_um!r}."
        )
    return float(ox), float(oy)


def resample_area(hwc: np.ndarray, out_h: int, out_w: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Resize a float (rows, cols, C) image, or the fractional ``box`` of it.

    ``box`` is (left, top, right, bottom) in pixels. Box (area) averaging when shrinking, bilinear when
    enlarging. Each channel goes through PIL's float mode, far faster than a Gaussian anti-aliasing
    filter on large tiles.
    """
    from PIL import Image

    left, top, right, bottom = box or (0.0, 0.0, float(hwc.shape[1]), float(hwc.shape[0]))
    shrinking = out_h < bottom - top or out_w < right - left
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    out = np.empty((out_h, out_w, hwc.shape[2]), dtype=np.float32)
    for c in range(hwc.shape[2]):
        channel = Image.fromarray(np.ascontiguousarray(hwc[..., c], dtype=np.float32), mode="F")
        out[..., c] = np.asarray(channel.resize((out_w, out_h), method, box=(left, top, right, bottom)))
    return out


class SlideImage:
    """A 2-D image (H&E RGB or 1..k-channel fluorescence) registered to the slide's micron frame.

    Parameters
    ----------
    source
        Path to a TIFF / OME-TIFF (read lazily), JPEG or PNG, or an in-memory array of shape
        (rows, cols) or (rows, cols, channels).
    pixel_size_um
        Microns per pixel. For OME-TIFF it is taken from the metadata when not given; otherwise required.
    origin_um
        Slide micron coordinates (x, y) of the top-left corner of pixel (0, 0). Ignored when
        ``um_to_px`` is given.
    um_to_px
        Optional 3 x 3 affine matrix mapping (x_um, y_um, 1) to (col, row, 1), for images that are
        rotated or sheared relative to the slide (e.g. an H&E image aligned to Xenium); the image's
        ``from_matrix`` attribute then is True.
    channel_axis
        For arrays / TIFFs stored channel-first (C, rows, cols), give 0.
    """

    def __init__(
        self,
        source: str | Path | np.ndarray,
        pixel_size_um: float | None = None,
        origin_um: Sequence[float] = (0.0, 0.0),
        um_to_px: np.ndarray | None = None,
        channel_axis: int | None = None,
    ):
        self.path: Path | None = None
        self._levels: list = []
        ome_px = None
        if isinstance(source, np.ndarray):
            array = source
            if channel_axis == 0 and array.ndim == 3:
                array = np.moveaxis(array, 0, -1)
            self._levels = [array]
        else:
            self.path = Path(source)
            if not self.path.exists():
                raise InputError(f"Image file not found: {self.path}. Check the path (and that the image was copied).")
            suffix = self.path.suffix.lower()
            if suffix in _TIFF_SUFFIXES:
                ome_px = self._open_tiff(channel_axis)
            elif suffix in _PLAIN_SUFFIXES:
                self._levels = self._open_plain()
            else:
                raise InputError(
                    f"Unsupported image format '{suffix}' for {self.path}; use TIFF/OME-TIFF, JPEG or PNG."
                )
        if pixel_size_um is None:
            if ome_px is not None and np.isnan(ome_px):
                raise GeometryError(
                    f"The OME metadata of image {self.path} has a PhysicalSizeX that is not a positive number. "
                    "Pass pixel_size_um (--pixel-size), the microns per pixel of the image."
                )
            pixel_size_um = ome_px
        if pixel_size_um is None:
            raise GeometryError(
                f"The pixel size of image {self.path or 'array'} is unknown: it has no OME PhysicalSizeX. "
                "Pass pixel_size_um (microns per pixel, e.g. 0.2125 for a Xenium morphology image)."
            )
        pixel_size_um = positive_number(pixel_size_um, "pixel_size_um (--pixel-size)")
        base = self._levels[0]
        if base.ndim not in (2, 3):
            raise InputError(f"Image {self.path or 'array'} has {base.ndim} dimensions; expected 2 (rows, cols) or 3.")
        if base.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
            raise InputError(f"Image dtype {base.dtype} is not supported; expected uint8, uint16 or float.")
        self.pixel_size_um = pixel_size_um
        self.from_matrix = um_to_px is not None  # placed by an alignment matrix, not pixel size + origin
        if um_to_px is None:
            ox, oy = origin_xy(origin_um)
            um_to_px = np.array(
                [[1 / self.pixel_size_um, 0, -ox / self.pixel_size_um], [0, 1 / self.pixel_size_um, -oy / self.pixel_size_um], [0, 0, 1]]
            )
        um_to_px = np.asarray(um_to_px, dtype=float)
        if um_to_px.shape != (3, 3) or not np.all(np.isfinite(um_to_px)) or abs(np.linalg.det(um_to_px[:2, :2])) < 1e-12:
            raise GeometryError(f"um_to_px must be an invertible 3 x 3 affine matrix, got {um_to_px!r}.")
        self.um_to_px = um_to_px
        self._intensity_max: np.ndarray | None = None

    # ----------------------------------------------------------------------------------------- opening
    def _open_tiff(self, channel_axis: int | None) -> float | None:
        import tifffile
        import zarr

        try:
            with tifffile.TiffFile(self.path) as tif:
                ome_px = _ome_pixel_size_um(tif.ome_metadata) if tif.is_ome else None
                series = tif.series[0]
                axes = series.axes
                n_levels = len(series.levels)
                # The strips / tiles must lie inside the file: a cut-off copy otherwise opens fine and
                # fails only when tiling reaches its missing end.
                ends = [max(np.add(page.dataoffsets, page.databytecounts), default=0)
                        for level in series.levels for page in level.pages if page is not None]
            size = self.path.stat().st_size
        except Exception as exc:  # tifffile raises many types on damaged files
            raise InputError(f"Cannot read TIFF {self.path}: {exc}. The file may be truncated or not a TIFF.") from exc
        if max(ends, default=0) > size:
            raise InputError(
                f"Cannot read image {self.path}: the file is truncated ({size:,} bytes, but its pixel data run to "
                f"{max(ends):,} bytes). Copy or export the image again."
            )
        for level in range(n_levels):
            store = tifffile.imread(self.path, aszarr=True, series=0, level=level)
            arr = zarr.open(store, mode="r")
            self._levels.append(_ChannelLast(arr, axes, channel_axis))
        try:  # decode the far corner of the smallest level: one strip / tile, cheap
            lowest = self._levels[-1]
            lowest[lowest.shape[0] - 1 : lowest.shape[0], lowest.shape[1] - 1 : lowest.shape[1]]
        except Exception as exc:
            raise InputError(
                f"Cannot read image {self.path}: decoding its last strip / tile failed ({exc}). The file is "
                "truncated or corrupt; copy or export the image again."
            ) from exc
        return ome_px

    def _open_plain(self) -> list:
        """Levels of a JPEG / PNG: a JPEG's four scales (decoded when first read), else the decoded image."""
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # whole-slide H&E JPEGs are legitimately large
        try:
            with Image.open(self.path) as im:
                if im.format == "JPEG" and im.mode in ("RGB", "L"):
                    cols, rows = im.size
                    levels = [_JpegLevel(self.path, rows, cols, im.mode, k) for k in _JPEG_SCALES]
                else:
                    im.load()
                    if im.mode not in ("RGB", "L", "I;16"):
                        im = im.convert("RGB")
                    return [pil_to_array(im)]
            levels[-1].decode()  # the smallest scale: reads the whole file, so damage shows now
            return levels
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"Cannot decode image {self.path}: {exc}. The file may be corrupt or truncated.") from exc

    # ----------------------------------------------------------------------------------------- properties
    @property
    def shape_px(self) -> tuple[int, int]:
        """(rows, cols) of the full-resolution level."""
        return tuple(int(v) for v in self._levels[0].shape[:2])

    @property
    def n_channels(self) -> int:
        """Number of channels (1 for a 2-D image)."""
        shape = self._levels[0].shape
        return 1 if len(shape) == 2 else int(shape[2])

    @property
    def dtype(self) -> np.dtype:
        """Pixel type of the stored image."""
        return np.dtype(self._levels[0].dtype)

    @property
    def is_rgb(self) -> bool:
        """True for an 8-bit 3-channel (H&E-like) image."""
        return self.n_channels == 3 and self.dtype == np.uint8

    @property
    def px_to_um(self) -> np.ndarray:
        """The 3 x 3 affine map from (col, row, 1) pixels to (x_um, y_um, 1), the inverse of ``um_to_px``."""
        return np.linalg.inv(self.um_to_px)

    def to_px(self, xy_um: np.ndarray) -> np.ndarray:
        """Map (n, 2) micron coordinates to (n, 2) fractional (col, row) pixel coordinates."""
        xy = np.asarray(xy_um, dtype=float).reshape(-1, 2)
        return xy @ self.um_to_px[:2, :2].T + self.um_to_px[:2, 2]

    def extent_um(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in microns of the image's outer edges."""
        rows, cols = self.shape_px
        corners = np.array([[0, 0], [cols, 0], [0, rows], [cols, rows]], dtype=float)
        um = corners @ self.px_to_um[:2, :2].T + self.px_to_um[:2, 2]
        return float(um[:, 0].min()), float(um[:, 1].min()), float(um[:, 0].max()), float(um[:, 1].max())

    def contains_um(self, xy_um: np.ndarray) -> np.ndarray:
        """Boolean mask of the points that fall inside the image."""
        px = self.to_px(xy_um)
        rows, cols = self.shape_px
        return (px[:, 0] >= 0) & (px[:, 0] < cols) & (px[:, 1] >= 0) & (px[:, 1] < rows)

    # ----------------------------------------------------------------------------------------- reading
    def _level_scale(self, level: int) -> float:
        """Full-resolution pixels per pixel of ``level`` (exact for a JPEG's scales, else from the widths)."""
        exact = getattr(self._levels[level], "downsample", None)
        return float(exact) if exact else self._levels[0].shape[1] / self._levels[level].shape[1]

    def read_px(self, row0: int, col0: int, rows: int, cols: int, level: int = 0) -> np.ndarray:
        """Raw pixels (rows, cols, C) of a window at a pyramid level; outside the image is 0."""
        arr = self._levels[level]
        h, w = arr.shape[:2]
        out = np.zeros((rows, cols, self.n_channels), dtype=arr.dtype)
        r0, c0 = max(row0, 0), max(col0, 0)
        r1, c1 = min(row0 + rows, h), min(col0 + cols, w)
        if r1 > r0 and c1 > c0:
            window = np.asarray(arr[r0:r1, c0:c1])
            out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = window.reshape(r1 - r0, c1 - c0, -1)
        return out

    def intensity_max(self) -> np.ndarray:
        """Return the per-channel value mapped to 1.0.

        255 for uint8; for other types a robust maximum (99.9th percentile) of an overview, so every tile
        of a slide is scaled the same way.
        """
        if self._intensity_max is None:
            if self.dtype == np.uint8:
                self._intensity_max = np.full(self.n_channels, 255.0)
            else:
                overview = self.overview(max_side=1024).reshape(-1, self.n_channels).astype(np.float64)
                top = np.percentile(overview, 99.9, axis=0)
                self._intensity_max = np.where(top > 0, top, 1.0)
        return self._intensity_max

    def overview(self, max_side: int = 1024) -> np.ndarray:
        """Return a strided low-resolution view (rows, cols, C) of the whole image in raw units."""
        level = len(self._levels) - 1
        arr = self._levels[level]
        step = max(1, int(np.ceil(max(arr.shape[:2]) / max_side)))
        view = np.asarray(arr[::step, ::step])
        return view.reshape(view.shape[0], view.shape[1], -1)

    def read_region_um(
        self, x0_um: float, y0_um: float, width_um: float, height_um: float, out_pixel_size_um: float
    ) -> np.ndarray:
        """Resample a micron rectangle to ``out_pixel_size_um``.

        Returns float32 (C, H, W) in [0, 1] with H = round(height_um / out_pixel_size_um). Reads only
        the pixels under the rectangle, from the coarsest pyramid level that is still at least as
        fine as the requested pixel size (for a JPEG's reduced scales: at least twice as fine).
        """
        out_h = int(round(height_um / out_pixel_size_um))
        out_w = int(round(width_um / out_pixel_size_um))
        if out_h < 1 or out_w < 1:
            raise GeometryError(
                f"Requested region {width_um} x {height_um} µm at {out_pixel_size_um} µm/px has no pixels."
            )
        level = 0
        for lv in range(1, len(self._levels)):
            # A JPEG scale must leave >= 2 of its pixels per output pixel: the area resampling counts whole
            # pixels, so fewer would alias, and a finer JPEG scale costs little.
            margin = getattr(self._levels[lv], "min_shrink", 1.0)
            if self.pixel_size_um * self._level_scale(lv) * margin <= out_pixel_size_um * 1.001:
                level = lv
        scale = self._level_scale(level)
        # Output pixel (c, r) centre -> slide microns -> level pixels.
        out_to_um = np.array(
            [[out_pixel_size_um, 0, x0_um], [0, out_pixel_size_um, y0_um], [0, 0, 1]], dtype=float
        )
        um_to_level = np.diag([1 / scale, 1 / scale, 1.0]) @ self.um_to_px
        out_to_level = um_to_level @ out_to_um
        corners = np.array([[0, 0, 1], [out_w, 0, 1], [0, out_h, 1], [out_w, out_h, 1]], dtype=float)
        level_corners = corners @ out_to_level.T
        col_lo, row_lo = np.floor(level_corners[:, :2].min(axis=0)).astype(int) - 1
        col_hi, row_hi = np.ceil(level_corners[:, :2].max(axis=0)).astype(int) + 1
        window = self.read_px(row_lo, col_lo, row_hi - row_lo, col_hi - col_lo, level=level)
        window = window.astype(np.float32) / self.intensity_max().astype(np.float32)
        window = np.clip(window, 0.0, 1.0)
        axis_aligned = abs(out_to_level[0, 1]) < 1e-9 and abs(out_to_level[1, 0]) < 1e-9
        if axis_aligned:
            # The exact (fractional) rectangle inside the window.
            c0 = out_to_level[0, 2] - col_lo
            r0 = out_to_level[1, 2] - row_lo
            box = (c0, r0, c0 + out_w * out_to_level[0, 0], r0 + out_h * out_to_level[1, 1])
            result = resample_area(window, out_h, out_w, box)
        else:
            # General affine: warp output pixel centres into the window.
            shift = np.array([[1, 0, -col_lo], [0, 1, -row_lo], [0, 0, 1]], dtype=float)
            centre = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=float)
            matrix = shift @ out_to_level @ centre
            matrix[:2, 2] -= 0.5
            result = warp(window, AffineTransform(matrix=matrix), output_shape=(out_h, out_w), order=1, preserve_range=True)
        return np.ascontiguousarray(np.moveaxis(result.astype(np.float32), -1, 0))

    def values_at_um(self, xy_um: np.ndarray, channel: int = 0) -> np.ndarray:
        """Raw full-resolution pixel values at micron points (nearest pixel; NaN outside the image)."""
        px = np.floor(self.to_px(xy_um)).astype(int)
        inside = self.contains_um(xy_um)
        values = np.full(len(px), np.nan)
        if inside.any():
            cols, rows = px[inside, 0], px[inside, 1]
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            window = self.read_px(r0, c0, r1 - r0, c1 - c0)[..., channel]
            values[inside] = window[rows - r0, cols - c0]
        return values

    def __repr__(self) -> str:
        rows, cols = self.shape_px
        x0, y0, x1, y1 = self.extent_um()
        return (
            f"SlideImage({self.path.name if self.path else 'array'}: {rows} x {cols} px, {self.n_channels} ch "
            f"{self.dtype}, {self.pixel_size_um:g} µm/px, x {x0:.1f}-{x1:.1f} µm, y {y0:.1f}-{y1:.1f} µm, "
            f"{len(self._levels)} level(s))"
        )


_JPEG_SCALES = (1, 2, 4, 8)  # the scales libjpeg decodes to directly (1/k of each side)


def pil_to_array(im) -> np.ndarray:
    """Copy a decoded PIL image into a (rows, cols[, C]) array, in bands.

    ``np.asarray(im)`` goes through one ``tobytes()`` of the whole image, a third copy in memory beside PIL's
    own (4 bytes per RGB pixel) and the array's; bands of 256 rows keep the peak at PIL's copy plus the array.
    """
    cols, rows = im.size
    first = np.asarray(im.crop((0, 0, cols, min(rows, 256))))
    out = np.empty((rows, *first.shape[1:]), dtype=first.dtype)
    out[: first.shape[0]] = first
    for r0 in range(first.shape[0], rows, 256):
        r1 = min(rows, r0 + 256)
        out[r0:r1] = np.asarray(im.crop((0, r0, cols, r1)))
    return out


class _JpegLevel:
    """One scale (1/``downsample`` of each side) of a JPEG, decoded whole on first access and kept.

    Its pixel (c, r) is the mean of full-resolution pixels [k c, k (c + 1)) x [k r, k (r + 1)) (libjpeg's
    DCT scaling), so ``downsample`` is the exact factor between the two pixel grids; the last row and
    column cover the padding libjpeg adds up to a multiple of k. The full resolution is decoded by
    imagecodecs straight into the array (one copy, ~3x less memory than through PIL), the reduced scales
    by PIL's draft mode.
    """

    def __init__(self, path: Path, rows: int, cols: int, mode: str, downsample: int):
        self.path, self.mode, self.downsample = path, mode, downsample
        self.min_shrink = 2.0 if downsample > 1 else 1.0  # see SlideImage.read_region_um
        self.full_shape = (rows, cols)
        channels = () if mode == "L" else (3,)
        self.shape = (-(-rows // downsample), -(-cols // downsample), *channels)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.uint8)
        self._array: np.ndarray | None = None

    def decode(self) -> np.ndarray:
        """Decode this scale of the file (once) and return it."""
        if self._array is None:
            array = self._decode_full() if self.downsample == 1 else None
            if array is None:
                try:
                    array = self._decode_pil()
                except Exception as exc:
                    raise InputError(f"Cannot decode image {self.path}: {exc}. The file may be corrupt or "
                                     "truncated.") from exc
            array.flags.writeable = False  # shared by every read, like the array of an in-memory image
            if array.shape != self.shape:
                raise InputError(f"Decoding {self.path} at 1/{self.downsample} scale gave {array.shape[:2]} pixels, "
                                 f"expected {self.shape[:2]}; the JPEG is unusual, convert it to TIFF.")
            self._array = array
        return self._array

    def _decode_full(self) -> np.ndarray | None:
        try:
            from imagecodecs import jpeg8_decode
        except ImportError:  # imagecodecs built without libjpeg: PIL does it (more memory)
            return None
        try:
            array = jpeg8_decode(self.path.read_bytes(), outcolorspace="GRAY" if self.mode == "L" else "RGB")
        except Exception:  # let PIL try, and word the error if it fails too
            return None
        return array[..., 0] if array.ndim == 3 and self.mode == "L" else array

    def _decode_pil(self) -> np.ndarray:
        from PIL import Image

        with Image.open(self.path) as im:
            rows, cols = self.full_shape
            k = self.downsample
            if k > 1:
                # PIL picks the largest scale k with size // request >= k: ask for size // k.
                im.draft(self.mode, (max(1, cols // k), max(1, rows // k)))
            im.load()
            return pil_to_array(im)

    def __getitem__(self, key) -> np.ndarray:
        return self.decode()[key]


class _ChannelLast:
    """A zarr array viewed as (rows, cols[, C]) whatever the TIFF's axis order (YX, YXS, CYX)."""

    def __init__(self, arr, axes: str, channel_axis: int | None):
        self._arr = arr
        axes = axes.upper()
        if arr.ndim == 2:
            self._perm = None
        elif arr.ndim == 3:
            if channel_axis == 0 or axes[0] in "CS":
                self._perm = "CYX"
            else:
                self._perm = "YXC"
        else:
            raise InputError(
                f"TIFF with axes '{axes}' ({arr.ndim} dimensions) is not supported; save a 2-D image or YXC/CYX."
            )
        self.dtype = arr.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        s = self._arr.shape
        if self._perm is None:
            return s
        if self._perm == "CYX":
            return (s[1], s[2], s[0])
        return s

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        if self._perm == "CYX":
            rows, cols = key
            return np.moveaxis(np.asarray(self._arr[:, rows, cols]), 0, -1)
        return np.asarray(self._arr[key])
