"""Comparison figures: histology, LR, baselines, Diff-ST and ground truth side by side (like the
paper's Fig. 3), and metric-versus-steps plots for the sampler benchmark."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffst.plotting.preview import show_histology, show_map  # noqa: E402


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
    """
    cols = 2 + len(maps)
    fig, axes = plt.subplots(len(gene_idx), cols, figsize=(2.6 * cols, 2.4 * len(gene_idx)), squeeze=False)
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
    plt.close(fig)
    return path


def plot_metric_vs_steps(rows: Sequence[Mapping], path: str | Path, reference: Mapping[str, float] | None = None,
                         metric: str = "pcc", title: str = "") -> Path:
    """Metric against number of sampling steps, one line per sampler; reference lines (e.g. bicubic,
    noise ceiling) drawn horizontally. ``rows`` have keys ``method``, ``steps`` and ``metric``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
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
    plt.close(fig)
    return path
