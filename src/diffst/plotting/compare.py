"""Comparison figures: histology, LR, baselines, Diff-ST and ground truth side by side.

Like the paper's Fig. 3; and metric-versus-steps plots for the sampler benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffst.plotting.preview import new_figure, show_histology, show_map


def plot_comparison(
    tissue: np.ndarray,
    lr_counts: np.ndarray,
    maps: Mapping[str, np.ndarray],
    genes: Sequence[str],
    gene_idx: Sequence[int],
    path: str | Path,
    title: str = "",
) -> Path:
    """One row per gene: histology, LR, then each entry of ``maps`` (name -> (N, H, W) counts per HR bin).

    Prediction and truth share one colour scale per gene (the truth's 99th percentile) so they can
    be compared by eye; the LR map keeps its own scale (counts per LR bin).

    Parameters
    ----------
    tissue
        (C, H, W) histology of the tile.
    lr_counts
        (N, h, w) LR counts per LR bin.
    maps
        Name -> (N, H, W) HR maps in counts per HR bin; ``"observed"`` is the ground truth (sets the colour
        scale when present), names starting with ``"std"`` keep their own scale.
    genes
        Names of the N genes.
    gene_idx
        Genes to show, one row each.
    path
        PNG file to write.
    title
        Figure title; none when empty.

    Returns
    -------
    Path
        ``path``.
    """
    cols = 2 + len(maps)
    fig, axes = new_figure(len(gene_idx), cols, figsize=(2.6 * cols, 2.4 * len(gene_idx)))
    truth = maps.get("observed")
    for row, g in enumerate(gene_idx):
        show_histology(axes[row, 0], tissue, "histology")
        show_map(axes[row, 1], lr_counts[g], f"{genes[g]} LR", fig, label="counts / LR bin")
        ref = truth[g] if truth is not None else next(iter(maps.values()))[g]
        vmax = float(max(np.percentile(ref, 99), 1e-6))
        for c, (name, values) in enumerate(maps.items()):
            is_std = name.startswith("std")
            show_map(axes[row, 2 + c], values[g], f"{genes[g]} {name}", fig, vmax=None if is_std else vmax,
                     label="counts / HR bin")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_metric_vs_steps(rows: Sequence[Mapping], path: str | Path, reference: Mapping[str, float] | None = None,
                         metric: str = "pcc", title: str = "") -> Path:
    """Plot a metric against the number of sampling steps, one line per sampler.

    Parameters
    ----------
    rows
        One mapping per (sampler, steps) result, with keys ``method``, ``steps`` and ``metric``.
    path
        PNG file to write.
    reference
        Name -> value drawn as horizontal dashed lines (e.g. bicubic, noise ceiling).
    metric
        Key of the metric in ``rows`` (also the y-axis label).
    title
        Axes title.

    Returns
    -------
    Path
        ``path``.
    """
    fig, axes = new_figure(1, 1, figsize=(5.5, 3.8))
    ax = axes[0, 0]
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["steps"], r[metric]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for i, (name, value) in enumerate((reference or {}).items()):
        ax.axhline(value, color=f"C{i + 5}", linestyle="--", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
