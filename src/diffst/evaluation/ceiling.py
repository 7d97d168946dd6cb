"""Noise ceiling: how well even the true expression rate could correlate with observed HR counts.

Counts are Poisson-like, so observed maps are noisy copies of the underlying rate. Splitting the
transcripts of each tile at random into two halves gives two independent noisy copies; their
correlation r gives the reliability of a full map by Spearman-Brown, r_full = 2r / (1 + r), and the
ceiling on the correlation of any prediction with the observed map is sqrt(r_full).
"""

from __future__ import annotations

import numpy as np

from diffst.core.sample import Sample
from diffst.data.tiling import bin_points
from diffst.evaluation.metrics import pearson_per_map


def split_half_ceiling(sample: Sample, genes: list[str], tile_origins: list[tuple[float, float]], hr_bin_um: float,
                       tile_hr: int, seed: int = 0) -> np.ndarray:
    """Per-gene noise ceiling (genes,) over the given tiles, averaged like ``evaluate_maps``' pcc."""
    if not sample.has_points:
        raise ValueError("The split-half ceiling needs point data (transcripts); spot data have no HR truth.")
    rng = np.random.default_rng(seed)
    idx = sample.gene_indices(genes)
    remap = np.full(len(sample.genes), -1)
    remap[idx] = np.arange(len(idx))
    tx = sample.transcripts
    codes = remap[tx["gene"].to_numpy()]
    keep = codes >= 0
    codes, x, y = codes[keep], tx["x_um"].to_numpy()[keep], tx["y_um"].to_numpy()[keep]
    half = rng.random(len(codes)) < 0.5
    rs = []
    for x0, y0 in tile_origins:
        a = bin_points(codes[half], x[half], y[half], len(idx), (x0, y0), hr_bin_um, (tile_hr, tile_hr))
        b = bin_points(codes[~half], x[~half], y[~half], len(idx), (x0, y0), hr_bin_um, (tile_hr, tile_hr))
        rs.append(pearson_per_map(a, b))
    r = np.clip(np.nanmean(np.stack(rs), axis=0), 0, None)
    return np.sqrt(2 * r / (1 + r))


def summarise_ceiling(per_gene: np.ndarray, genes: list[str]) -> dict:
    """Average the ceiling over the genes that have counts in the tiles and list the skipped genes.

    A gene without any count in the evaluated tiles has no defined correlation.
    """
    per_gene = np.asarray(per_gene, dtype=np.float64)
    skipped = [g for g, v in zip(genes, per_gene, strict=True) if not np.isfinite(v)]
    finite = per_gene[np.isfinite(per_gene)]
    return {"pcc": float(finite.mean()) if len(finite) else float("nan"), "genes_skipped": skipped,
            "n_genes_skipped": len(skipped)}
