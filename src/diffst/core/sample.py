"""One tissue sample in memory: expression with coordinates in microns, gene names and the image.

Two kinds of expression exist: point transcripts (Xenium and other imaging platforms; HR ground truth
can be binned at any size) and spots or cells with counts (Visium, Visium HD, legacy ST, AnnData).
Both live in the slide's micron frame, the same frame ``SlideImage.um_to_px`` maps from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diffst.core.image import XENIUM_PIXEL_SIZE_UM, SlideImage
from diffst.errors import GeometryError, InputError

log = logging.getLogger("diffst.data")

#: Transcripts per chunk where a whole slide's coordinates are scanned (:meth:`Sample.xy_chunks`): 1 MB of float64.
XY_CHUNK_ROWS = 1 << 16
# Sample.check_placement: the first pixel-size search covers factors 0.1x-10x, exp(step) = 15.5 % apart.
_SCALE_STEP = float(np.log(10.0) / 16)


@dataclass
class SpotTable:
    """Counts measured at spots (or cells / HD bins) with their centres in microns.

    counts: (n_spots, n_genes) non-negative counts (scipy CSR or dense).
    xy_um: (n_spots, 2) spot centres (x, y) in slide microns.
    diameter_um: spot diameter (Visium 55, legacy ST 100, Visium HD bin size); 0 for cells.
    pitch_um: centre-to-centre spacing of the array (Visium 100, legacy ST 200), or None.
    ids: spot barcodes / names.
    """

    counts: sp.csr_matrix | np.ndarray
    xy_um: np.ndarray
    diameter_um: float
    pitch_um: float | None
    ids: np.ndarray

    def __post_init__(self):
        self.counts = sp.csr_matrix(self.counts) if not sp.issparse(self.counts) else self.counts.tocsr()
        self.xy_um = np.asarray(self.xy_um, dtype=float)
        n = self.counts.shape[0]
        if self.xy_um.shape != (n, 2):
            raise InputError(f"Spot coordinates have shape {self.xy_um.shape} but counts have {n} spots; expected ({n}, 2).")
        if len(self.ids) != n:
            raise InputError(f"{len(self.ids)} spot ids for {n} spots: the spot table and the counts disagree.")
        if not np.all(np.isfinite(self.xy_um)):
            raise GeometryError("Spot coordinates contain NaN or infinite values; drop those spots or fix the table.")
        data = self.counts.data
        if data.size and not np.all(np.isfinite(data)):
            raise InputError("Counts contain NaN or infinite values; expression must be finite raw counts.")
        if data.size and data.min() < 0:
            raise InputError(f"Counts contain negative values (min {data.min()}); expected raw non-negative counts.")


@dataclass
class Sample:
    """One tissue section.

    Attributes
    ----------
    name
        Sample id (used for sample-level splits).
    genes
        Gene names; ``transcripts['gene']`` and the columns of ``spots.counts`` index into it.
    image
        The registered histology / morphology image, or None.
    transcripts
        DataFrame with integer column ``gene`` and float columns ``x_um``, ``y_um`` (plus optional
        ``overlaps_nucleus``), or None. :func:`~diffst.io.read_xenium` stores them compactly: int16 gene
        codes, float32 microns, int8 ``overlaps_nucleus``; :meth:`xy_um` gives float64.
    spots
        A :class:`SpotTable`, or None.
    platform
        "xenium", "visium", "visium_hd", "legacy_st", "anndata" or "synthetic".
    """

    name: str
    genes: list[str]
    image: SlideImage | None = None
    transcripts: pd.DataFrame | None = None
    spots: SpotTable | None = None
    platform: str = "unknown"
    meta: dict = field(default_factory=dict)
    _warned_outside: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        if (self.transcripts is None) == (self.spots is None):
            raise InputError("A Sample needs exactly one of transcripts (point data) or spots (counts at spots).")
        self.genes = [str(g) for g in self.genes]
        if len(set(self.genes)) != len(self.genes):
            dup = pd.Series(self.genes)[pd.Series(self.genes).duplicated()].unique()[:5]
            raise InputError(f"Gene names are not unique (e.g. {list(dup)}); make them unique first.")
        if self.spots is not None and self.spots.counts.shape[1] != len(self.genes):
            raise InputError(
                f"Counts have {self.spots.counts.shape[1]} genes but {len(self.genes)} gene names were given."
            )
        if self.transcripts is not None:
            missing = {"gene", "x_um", "y_um"} - set(self.transcripts.columns)
            if missing:
                raise InputError(f"Transcript table lacks columns {sorted(missing)}; expected gene, x_um, y_um.")
            n_bad = sum(int((~(np.isfinite(xy[:, 0]) & np.isfinite(xy[:, 1]))).sum()) for xy in self.xy_chunks())
            if n_bad:
                raise GeometryError(
                    f"Transcript coordinates contain NaN or infinite values in {n_bad} of {len(self.transcripts)} "
                    "rows; drop or fix those rows."
                )

    # ------------------------------------------------------------------------------------------
    @property
    def has_points(self) -> bool:
        """True for point transcripts, False for counts at spots."""
        return self.transcripts is not None

    def xy_um(self) -> np.ndarray:
        """Coordinates of every transcript or spot, (n, 2) microns."""
        if self.transcripts is not None:
            return self.transcripts[["x_um", "y_um"]].to_numpy(dtype=float)
        return self.spots.xy_um

    def xy_chunks(self, rows: int = XY_CHUNK_ROWS, stride: int = 1) -> Iterator[np.ndarray]:
        """Coordinates of the transcripts (or spots) ``rows`` at a time, (k, 2) float64 microns each.

        What :meth:`xy_um` holds (every ``stride``-th transcript), without a float64 copy of a whole slide's
        transcripts (16 bytes each).
        """
        if self.transcripts is None:
            yield self.spots.xy_um[::stride]
            return
        x, y = self.transcripts["x_um"].to_numpy()[::stride], self.transcripts["y_um"].to_numpy()[::stride]
        for start in range(0, len(x), rows):
            yield np.column_stack([x[start : start + rows], y[start : start + rows]]).astype(float, copy=False)

    def extent_um(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the expression data in microns."""
        if self.transcripts is not None:  # the stored columns' own extremes: the same numbers as float64
            x, y = self.transcripts["x_um"].to_numpy(), self.transcripts["y_um"].to_numpy()
        else:
            x, y = self.spots.xy_um[:, 0], self.spots.xy_um[:, 1]
        if len(x) == 0:
            raise InputError(f"Sample {self.name} has no transcripts or spots.")
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())

    def gene_totals(self) -> pd.Series:
        """Total counts per gene, indexed by gene name."""
        if self.transcripts is not None:
            totals = np.bincount(self.transcripts["gene"].to_numpy(), minlength=len(self.genes))
        else:
            totals = np.asarray(self.spots.counts.sum(axis=0)).ravel()
        return pd.Series(totals, index=self.genes, name="total_counts")

    def gene_indices(self, genes: Sequence[str]) -> np.ndarray:
        """Column indices of ``genes``; raises naming every missing gene."""
        lookup = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in lookup]
        if missing:
            raise InputError(
                f"Sample {self.name} lacks {len(missing)} requested gene(s): {missing[:10]}. "
                f"Choose genes present in all samples (this one has {len(self.genes)} genes) or use top-N selection."
            )
        return np.array([lookup[g] for g in genes], dtype=int)

    def check_registration(self, tolerance: float = 0.02) -> None:
        """Raise if the expression does not lie on the image (the classic wrong-pixel-size failure).

        More than ``tolerance`` of the transcripts / spots outside the image is a GeometryError naming
        the likely cause; fewer are logged once (they are ignored when tiling). For spots, the spacing
        is also checked against the platform's pitch.
        """
        if self.image is None:
            return
        n_all = n_out = n_neg = 0
        for xy in self.xy_chunks():  # a chunk at a time: a whole slide's float64 copies would cost ~60 B/transcript
            outside = ~self.image.contains_um(xy)
            n_all += len(xy)
            n_out += int(outside.sum())
            n_neg += int((xy < 0).any(axis=1).sum())
        frac_out = n_out / max(n_all, 1)
        what = "transcripts" if self.has_points else "spots"
        if frac_out > tolerance:
            x0, y0, x1, y1 = self.image.extent_um()
            ex = self.extent_um()
            raise GeometryError(
                f"{frac_out:.0%} of the {what} of sample {self.name} fall "
                f"outside its image: data span x {ex[0]:.0f}-{ex[2]:.0f} µm, y {ex[1]:.0f}-{ex[3]:.0f} µm, but the "
                f"image covers x {x0:.0f}-{x1:.0f} µm, y {y0:.0f}-{y1:.0f} µm at {self.image.pixel_size_um:g} µm/px. "
                f"{'' if self.image.from_matrix else _likely_cause(ex, (x0, y0, x1, y1), self.image.pixel_size_um)}"
                "Check the pixel size (full-resolution vs hires/lowres image scale factor) and the image origin "
                "(image_origin_um / --image-origin for cropped Xenium images)."
            )
        if n_out and not self._warned_outside:
            self._warned_outside = True  # prepare_dataset checks again; say it once
            log.warning(
                "%d of %d %s (%.2f%%) of sample %s fall outside its image (%d with negative coordinates); they are "
                "dropped when tiling.", n_out, n_all, what, 100 * frac_out, self.name, n_neg,
            )
        if self.spots is not None and self.spots.pitch_um and n_all > 3:
            from scipy.spatial import cKDTree

            xy = self.spots.xy_um
            dist, _ = cKDTree(xy).query(xy, k=2)
            spacing = float(np.median(dist[:, 1]))
            # Hexagonal (Visium) and square (legacy ST) arrays: nearest neighbour = pitch.
            if not (0.8 * self.spots.pitch_um <= spacing <= 1.25 * self.spots.pitch_um):
                raise GeometryError(
                    f"Spots of sample {self.name} are {spacing:.1f} µm apart but the platform's pitch is "
                    f"{self.spots.pitch_um:g} µm: the pixel size used to convert spot pixels to microns is off by "
                    f"x{self.spots.pitch_um / spacing:.2f}. Use the full-resolution pixel size (or the right scale factor)."
                )

    def check_placement(self, strict: bool = True) -> dict[str, float]:
        """Check that the image sits where the transcripts are, the point-data twin of the spot-pitch check.

        Transcripts are binned on a micron grid and their density is correlated with the mean image signal
        in the same bins (fluorescence intensity; darkness for RGB H&E), read from a strided overview. The
        pixel size that fits best is searched with the image's top-left corner fixed, coarse to fine:
        factors 0.1x-10x of the given one, 15 % apart, on bins 40 % as wide as one step moves the farthest
        transcripts; then around the best factor with 4x finer steps on 4x finer bins, down to bins of
        >= 30 µm (>= 0.5 % of the slide) and steps < 5 % (the scores reported and compared). Factors
        within 1.5 last steps of 1 count as the given size. The image shifted by a quarter of its size each way is compared too. Placements holding
        under half of the transcripts are not compared. The overview is read once for all placements:
        ~0.1 s on a 500 µm crop.

        Parameters
        ----------
        strict
            Raise when another placement fits clearly better; False only logs a warning.

        Returns
        -------
        dict
            Correlation per compared placement on the finest bins ("given", "pixel size x0.425", "the image
            shifted by (+128, +0) µm", ...); empty when the sample has no image, is spot data or has too few
            transcripts to judge.

        Raises
        ------
        GeometryError
            When another placement agrees with the transcripts clearly better (by > 0.25) than the given one;
            the message names the pixel size (or origin) that fits.
        """
        if self.image is None or not self.has_points or len(self.transcripts) < 1000:
            return {}
        stride = max(1, len(self.transcripts) // 500_000)  # a full slide holds tens of millions
        # Strided views of the stored columns (turned into float64 (n, 2) a chunk at a time by xy_chunks).
        xs, ys = self.transcripts["x_um"].to_numpy()[::stride], self.transcripts["y_um"].to_numpy()[::stride]

        view = self.image.overview(max_side=512).astype(np.float32).mean(axis=-1)
        signal = (255.0 - view if self.image.is_rgb else view).ravel()  # H&E: tissue and nuclei are dark
        rows, cols = self.image.shape_px
        fr, fc = rows / view.shape[0], cols / view.shape[1]
        r, c = np.mgrid[: view.shape[0], : view.shape[1]]
        base = self.image.px_to_um
        px, (ox, oy) = self.image.pixel_size_um, base[:2, 2]
        # Overview sample centres in microns relative to the image's top-left corner: pixel size x f puts
        # them at f * linear + corner.
        linear = base[:2, :2] @ np.stack([(c.ravel() + 0.5) * fc, (r.ravel() + 0.5) * fr])
        corner = base[:2, 2:3]
        sample_area = abs(np.linalg.det(base[:2, :2])) * fr * fc  # µm² per overview sample at the given size
        x0, y0, x1, y1 = self.image.extent_um()
        w, h = x1 - x0, y1 - y0
        # Bins span the transcripts and the image as given or shifted; the parts of an enlarged image beyond
        # them hold no transcripts and are left out.
        data_lo = np.array([xs.min(), ys.min()], dtype=float)
        data_hi = np.array([xs.max(), ys.max()], dtype=float)
        lo = np.minimum(data_lo, [x0 - w / 4, y0 - h / 4])
        hi = np.maximum(data_hi, [x1 + w / 4, y1 + h / 4])
        # How far a wrong scale moves the farthest transcripts.
        reach = max(float(np.abs(part - corner[:, 0]).max()) for part in self.xy_chunks(stride=stride))
        fine = max(30.0, reach / 200, float(np.max(hi - lo)) / 400, 4 * float(np.sqrt(sample_area)))
        stages = [(_SCALE_STEP, max(fine, reach * _SCALE_STEP / 2.5))]  # (log step, bin µm)
        while stages[-1][1] > fine or stages[-1][0] > 0.05:
            step = stages[-1][0] / 4
            stages.append((step, max(fine, reach * step / 2.5)))
        same = 1.5 * stages[-1][0]  # |log factor| below this: the given pixel size within the search's precision
        need = 0.5 * len(xs)
        grids: dict[float, tuple] = {}

        def correlation(um: np.ndarray, factor: float, bin_um: float) -> float | None:
            """Correlation r of image signal and transcript density over the bins the image covers at least half of."""
            if bin_um not in grids:
                shape = (np.floor((hi - lo) / bin_um) + 1).astype(int)
                density = np.zeros(shape.prod(), dtype=np.int64)
                for part in self.xy_chunks(stride=stride):
                    ij = np.floor((part - lo) / bin_um).astype(np.int64)
                    density += np.bincount(ij[:, 1] * shape[0] + ij[:, 0], minlength=shape.prod())
                grids[bin_um] = shape, density
            (nx, ny), density = grids[bin_um]
            ij = np.floor((um - lo[:, None]) / bin_um).astype(np.int64)
            keep = (ij[0] >= 0) & (ij[0] < nx) & (ij[1] >= 0) & (ij[1] < ny)
            idx = ij[1, keep] * nx + ij[0, keep]
            n = np.bincount(idx, minlength=nx * ny)
            covered = n >= 0.5 * bin_um**2 / (factor**2 * sample_area)
            if covered.sum() < 16 or density[covered].sum() < need:
                return None
            mean = np.bincount(idx, weights=signal[keep], minlength=nx * ny)[covered] / n[covered]
            return float(np.corrcoef(mean, density[covered])[0, 1]) if mean.std() > 0 else None

        centre, by_factor = 1.0, {}
        for i, (step, bin_um) in enumerate(stages):
            ks = np.arange(-16, 17) if i == 0 else np.arange(-3, 4)
            by_factor = {}
            for f in [1.0] + [float(centre * np.exp(k * step)) for k in ks]:
                if (f == 1.0 or abs(np.log(f)) >= same) and f not in by_factor:
                    score = correlation(f * linear + corner, f, bin_um)
                    if score is not None:
                        by_factor[f] = score
            if by_factor:  # the given size may be judged on finer bins only (a narrow strip of transcripts)
                centre = max(by_factor, key=by_factor.get)
        if 1.0 not in by_factor:
            log.warning("Cannot check the image placement of sample %s: the image is blank under the transcripts "
                        "or covers fewer than 16 bins of %.0f µm.", self.name, bin_um)
            return {}
        scores, advice = {"given": by_factor.pop(1.0)}, {}
        digits = 3 if stages[-1][0] >= 0.02 else 4
        for f in sorted(by_factor):
            key = f"pixel size x{f:.{digits}g}"
            scores[key] = by_factor[f]
            advice[key] = _pixel_size_advice(px * f, self.platform == "xenium")
        for dx, dy in ((w / 4, 0), (-w / 4, 0), (0, h / 4), (0, -h / 4)):
            key = f"the image shifted by ({dx:+.0f}, {dy:+.0f}) µm"
            score = correlation(linear + corner + np.array([[dx], [dy]]), 1.0, bin_um)
            if score is not None:
                scores[key] = score
                advice[key] = (f"The image origin looks wrong; try image_origin_um (--image-origin) "
                               f"{ox + dx:.1f},{oy + dy:.1f}.")
        given = scores["given"]
        where = f"{px:g} µm/px, top-left corner at ({ox:.1f}, {oy:.1f}) µm"
        if not advice:
            if given < 0.1:
                log.warning("Cannot confirm the image placement of sample %s: image intensity follows transcript "
                            "density with r = %.2f at the given placement (%s).", self.name, given, where)
            return scores
        best = max(advice, key=scores.get)
        if scores[best] - given > 0.25 and scores[best] > 0.3:
            if self.image.from_matrix:
                advice[best] = "The image's alignment matrix (he_alignment for an H&E image) looks wrong."
            message = (
                f"The image of sample {self.name} does not line up with its transcripts: image intensity follows "
                f"transcript density with r = {given:.2f} at the given placement ({where}) but r = {scores[best]:.2f} "
                f"with {best}{' (same top-left corner)' if best.startswith('pixel size') else ''}. {advice[best]}"
            )
            if strict:
                raise GeometryError(message + " If the placement is right, pass --force-pixel-size (CLI) or "
                                    "force_pixel_size=True (read_xenium) to only warn.")
            log.warning(message)
        elif given < 0.1 or scores[best] > given + 0.05:
            log.warning(
                "Cannot confirm the image placement of sample %s: image intensity follows transcript density with "
                "r = %.2f at the given placement (%s) and r = %.2f with %s. If tiles look misaligned, check "
                "pixel_size_um (--pixel-size) and image_origin_um (--image-origin).",
                self.name, given, where, scores[best], best,
            )
        return scores

    def __repr__(self) -> str:
        what = f"{len(self.transcripts)} transcripts" if self.has_points else f"{self.spots.counts.shape[0]} spots"
        return f"Sample({self.name}, {self.platform}, {what}, {len(self.genes)} genes, image={self.image!r})"


def _likely_cause(data: Sequence[float], image: Sequence[float], pixel_size_um: float) -> str:
    """Hint at why data miss their image: too large for it (pixel size) or beside it (origin)."""
    spans = [(data[2] - data[0]) / max(image[2] - image[0], 1e-9), (data[3] - data[1]) / max(image[3] - image[1], 1e-9)]
    ratio = max(spans)
    if ratio > 1.02:
        return (
            f"Likely cause: the data span {ratio:.2f}x the image, so the pixel size is too small; pixel_size_um "
            f"(--pixel-size) of about {pixel_size_um * ratio:.4g} would fit. "
        )
    offset = max(abs(data[0] - image[0]) / max(image[2] - image[0], 1e-9), abs(data[1] - image[1]) / max(image[3] - image[1], 1e-9))
    if offset > 0.02:
        return (
            f"Likely cause: the data would fit in the image but start at ({data[0]:.0f}, {data[1]:.0f}) µm and the image "
            f"at ({image[0]:.0f}, {image[1]:.0f}) µm, so the image origin is off (for a crop, its top-left corner). "
        )
    return ""


def _pixel_size_advice(pixel_size_um: float, xenium: bool) -> str:
    """Say what to pass when the image fits best at ``pixel_size_um``: Xenium's size when close to one."""
    level = int(np.clip(np.round(np.log2(pixel_size_um / XENIUM_PIXEL_SIZE_UM)), 0, 3))
    native = XENIUM_PIXEL_SIZE_UM * 2**level
    if xenium and abs(pixel_size_um / native - 1) < 0.1:
        kind = "a full-resolution" if level == 0 else f"a {2**level}x downsampled"
        return (f"The pixel size looks wrong; the image fits best at about {pixel_size_um:.3g} µm/px, close to "
                f"{native:g} µm/px of {kind} Xenium morphology image: try pixel_size_um (--pixel-size) {native:g}.")
    return (f"The pixel size looks wrong; the image fits best at about {pixel_size_um:.3g} µm/px: try pixel_size_um "
            f"(--pixel-size) {pixel_size_um:.3g}.")
