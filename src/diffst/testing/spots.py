"""Spot-only slides made from point data: Visium-like or legacy-ST-like spots from real transcripts.

Test support only. :func:`spots_from_transcripts` lays a spot array over a point-data sample (e.g. the
built-in Xenium crop) and counts the transcripts under each spot's disc, so the self-supervised mode
(:func:`diffst.core.geometry.spot_pitch_geometry`, ``prepare_dataset(..., self_supervised=True)``) can be
tested on real expression with a known spot layout.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

from diffst.core.sample import Sample, SpotTable
from diffst.errors import GeometryError, InputError

__all__ = ["spot_lattice", "spots_from_transcripts"]


def spot_lattice(extent_um: tuple[float, float, float, float], pitch_um: float,
                 layout: Literal["hex", "square"] = "hex", margin_um: float = 0.0) -> np.ndarray:
    """Centres of a spot array covering a rectangle.

    Parameters
    ----------
    extent_um
        (x0, y0, x1, y1) rectangle in microns; centres lie at least ``margin_um`` inside it.
    pitch_um
        Centre-to-centre distance of neighbouring spots (Visium 100 µm, legacy ST 200 µm).
    layout
        ``"hex"``: Visium's layout, rows ``pitch * sqrt(3) / 2`` apart, every other row shifted by half a
        pitch (each spot has six neighbours at ``pitch``); ``"square"``: legacy ST's square array.
    margin_um
        Distance kept from the rectangle's edges (a spot's radius keeps whole discs inside).

    Returns
    -------
    np.ndarray
        (n, 2) spot centres (x, y) in microns, row by row.
    """
    if not pitch_um > 0:
        raise GeometryError(f"pitch_um must be a positive distance in microns, got {pitch_um}.")
    if layout not in ("hex", "square"):
        raise InputError(f"layout={layout!r}; choose 'hex' (Visium) or 'square' (legacy ST).")
    x0, y0, x1, y1 = (float(v) for v in extent_um)
    x0, y0, x1, y1 = x0 + margin_um, y0 + margin_um, x1 - margin_um, y1 - margin_um
    if x1 < x0 or y1 < y0:
        raise GeometryError(f"The rectangle {extent_um} leaves no room for spots {margin_um:g} µm inside its edges.")
    row_step = pitch_um * np.sqrt(3.0) / 2.0 if layout == "hex" else pitch_um
    centres = []
    for r, y in enumerate(np.arange(y0, y1 + 1e-9, row_step)):
        shift = pitch_um / 2.0 if layout == "hex" and r % 2 else 0.0
        xs = np.arange(x0 + shift, x1 + 1e-9, pitch_um)
        centres.append(np.column_stack([xs, np.full(len(xs), y)]))
    return np.concatenate(centres) if centres else np.zeros((0, 2))


def spots_from_transcripts(
    sample: Sample,
    *,
    pitch_um: float = 100.0,
    diameter_um: float = 55.0,
    layout: Literal["hex", "square"] = "hex",
    name: str | None = None,
) -> Sample:
    """Aggregate a point-data sample into spots: what a spot platform would have measured on that tissue.

    Spot centres come from :func:`spot_lattice` over the transcripts' extent, a radius inside it (so every
    disc lies on the data); each spot counts the transcripts within ``diameter_um / 2`` of its centre.
    Transcripts between spots are lost, as on a real array.

    Parameters
    ----------
    sample
        A sample with transcripts (``sample.has_points``) and its image.
    pitch_um, diameter_um
        Spot pitch and diameter (Visium: 100 and 55 µm; legacy ST: 200 and 100 µm, ``layout="square"``).
    layout
        ``"hex"`` (Visium) or ``"square"`` (legacy ST).
    name
        Name of the new sample (default: ``<sample.name>_spots``).

    Returns
    -------
    Sample
        A spot sample (platform ``"visium"`` for hex, ``"legacy_st"`` for square) with the same genes and
        image, ``spots.pitch_um = pitch_um`` and ``spots.diameter_um = diameter_um``.
    """
    from scipy.spatial import cKDTree

    if not sample.has_points:
        raise InputError(f"Sample {sample.name} already holds spots; spots_from_transcripts needs point data.")
    if not 0 < diameter_um < pitch_um:
        raise GeometryError(f"Spot diameter {diameter_um:g} µm must be positive and below the pitch {pitch_um:g} µm "
                            "(spots of an array do not overlap).")
    centres = spot_lattice(sample.extent_um(), pitch_um, layout, margin_um=diameter_um / 2.0)
    if len(centres) == 0:
        raise GeometryError(f"Sample {sample.name} is too small for one spot of {diameter_um:g} µm.")
    xy = sample.xy_um()
    dist, nearest = cKDTree(centres).query(xy, k=1)
    under = dist <= diameter_um / 2.0  # discs are disjoint (diameter < pitch): one spot at most
    genes = sample.transcripts["gene"].to_numpy()[under]
    counts = sp.csr_matrix((np.ones(int(under.sum()), dtype=np.float32), (nearest[under], genes)),
                           shape=(len(centres), len(sample.genes)))
    counts.sum_duplicates()
    ids = np.array([f"spot_{i:05d}" for i in range(len(centres))])
    table = SpotTable(counts=counts, xy_um=centres, diameter_um=float(diameter_um), pitch_um=float(pitch_um), ids=ids)
    platform = "visium" if layout == "hex" else "legacy_st"
    meta = {"aggregated_from": sample.name, "layout": layout}
    return Sample(name=name or f"{sample.name}_spots", genes=list(sample.genes), image=sample.image, spots=table,
                  platform=platform, meta=meta)
