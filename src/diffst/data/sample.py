"""One tissue sample in memory: expression with coordinates in microns, gene names and the image.

Two kinds of expression exist: point transcripts (Xenium and other imaging platforms; HR ground truth
can be binned at any size) and spots or cells with counts (Visium, Visium HD, legacy ST, AnnData).
Both live in the slide's micron frame, the same frame ``SlideImage.um_to_px`` maps from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diffst.errors import GeometryError, InputError

if TYPE_CHECKING:  # io imports data.sample; only the type is needed here
    from diffst.io.image import SlideImage


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
        ``overlaps_nucleus``, ``qv``), or None.
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
            xy = self.transcripts[["x_um", "y_um"]].to_numpy()
            if not np.all(np.isfinite(xy)):
                raise GeometryError("Transcript coordinates contain NaN or infinite values; drop or fix those rows.")

    # ------------------------------------------------------------------------------------------
    @property
    def has_points(self) -> bool:
        return self.transcripts is not None

    def xy_um(self) -> np.ndarray:
        """Coordinates of every transcript or spot, (n, 2) microns."""
        if self.transcripts is not None:
            return self.transcripts[["x_um", "y_um"]].to_numpy(dtype=float)
        return self.spots.xy_um

    def extent_um(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the expression data in microns."""
        xy = self.xy_um()
        if len(xy) == 0:
            raise InputError(f"Sample {self.name} has no transcripts or spots.")
        return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())

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
        """Raise if the expression does not lie on the image (the classic wrong-pixel-size failure)."""
        if self.image is None:
            return
        xy = self.xy_um()
        inside = self.image.contains_um(xy)
        frac_out = 1.0 - inside.mean()
        if frac_out > tolerance:
            x0, y0, x1, y1 = self.image.extent_um()
            ex = self.extent_um()
            raise GeometryError(
                f"{frac_out:.0%} of the {'transcripts' if self.has_points else 'spots'} of sample {self.name} fall "
                f"outside its image: data span x {ex[0]:.0f}-{ex[2]:.0f} µm, y {ex[1]:.0f}-{ex[3]:.0f} µm, but the "
                f"image covers x {x0:.0f}-{x1:.0f} µm, y {y0:.0f}-{y1:.0f} µm at {self.image.pixel_size_um:g} µm/px. "
                "Check the pixel size (full-resolution vs hires/lowres image scale factor) and the image origin "
                "(image_origin_um / --image-origin for cropped Xenium images)."
            )
        if self.spots is not None and self.spots.pitch_um and len(xy) > 3:
            from scipy.spatial import cKDTree

            dist, _ = cKDTree(xy).query(xy, k=2)
            spacing = float(np.median(dist[:, 1]))
            # Hexagonal (Visium) and square (legacy ST) arrays: nearest neighbour = pitch.
            if not (0.8 * self.spots.pitch_um <= spacing <= 1.25 * self.spots.pitch_um):
                raise GeometryError(
                    f"Spots of sample {self.name} are {spacing:.1f} µm apart but the platform's pitch is "
                    f"{self.spots.pitch_um:g} µm: the pixel size used to convert spot pixels to microns is off by "
                    f"x{self.spots.pitch_um / spacing:.2f}. Use the full-resolution pixel size (or the right scale factor)."
                )

    def __repr__(self) -> str:
        what = f"{len(self.transcripts)} transcripts" if self.has_points else f"{self.spots.counts.shape[0]} spots"
        return f"Sample({self.name}, {self.platform}, {what}, {len(self.genes)} genes, image={self.image!r})"
