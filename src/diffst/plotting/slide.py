"""The whole-slide figure of a prediction, like the paper's Fig. 3, drawn from the written AnnData.

One row per gene: the histology under the predicted region, the LR spots (each s x s block of the answer,
which with spot consistency is the measured spot), the point estimate, the samples' standard deviation and,
where it exists, the observed HR map. Maps share one colour scale per gene (the observed map's, else the
answer's, 99th percentile) with colour bars in counts; every panel has a scale bar in microns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffst.errors import InputError

__all__ = ["plot_slide", "region_maps"]


def region_maps(adata: Any, sample: str, layer: str | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Put one sample's bins of ``X`` (or a layer) back on its HR grid.

    Returns
    -------
    tuple
        ``(maps, origin_um)``: (genes, rows, cols) with NaN where no bin was predicted, and the (x, y) micron
        position of the grid's top-left corner.
    """
    obs = adata.obs
    rows_mask = np.asarray(obs["sample"] == sample)
    if not rows_mask.any():
        raise InputError(f"The prediction has no bins of sample '{sample}'; it has {sorted(obs['sample'].unique())}.")
    values = adata.X if layer is None else adata.layers[layer]
    values = np.asarray(values[rows_mask], dtype=np.float64)
    row = obs["row"].to_numpy()[rows_mask]
    col = obs["col"].to_numpy()[rows_mask]
    bin_um = float(adata.uns["diffst"]["geometry"]["hr_bin_um"])
    grid = np.full((values.shape[1], row.max() + 1, col.max() + 1), np.nan)
    grid[:, row, col] = values.T
    x_um, y_um = obs["x_um"].to_numpy()[rows_mask], obs["y_um"].to_numpy()[rows_mask]
    origin = (float(x_um.min() - (col[x_um.argmin()] + 0.5) * bin_um),
              float(y_um.min() - (row[y_um.argmin()] + 0.5) * bin_um))
    return grid, origin


def _spot_blocks(grid: np.ndarray, scale: int) -> np.ndarray:
    """Sum every s x s block of the HR grid (returned at HR size for display).

    The grid starts at a tile origin, and tiles start on the LR grid, so its blocks are the LR spots.
    """
    out = np.full_like(grid, np.nan)
    _, h, w = grid.shape
    for r in range(0, h - scale + 1, scale):
        for c in range(0, w - scale + 1, scale):
            block = grid[:, r : r + scale, c : c + scale]
            if np.isfinite(block).all():
                out[:, r : r + scale, c : c + scale] = block.sum(axis=(-2, -1))[:, None, None]
    return out


def _scale_bar(ax, bin_um: float, width_bins: int) -> None:
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    target = width_bins * bin_um / 4
    length_um = next((v for v in (1000, 500, 200, 100, 50, 20, 10) if v <= target), 10)
    ax.add_artist(AnchoredSizeBar(ax.transData, length_um / bin_um, f"{length_um} µm", "lower right",
                                  pad=0.3, color="white", frameon=False, size_vertical=0.3, fontproperties={"size": 6}))


def plot_slide(adata: Any, genes: Sequence[str] | None, path: str | Path, *, sample: str | None = None,
               n_genes: int = 3) -> Path:
    """Draw the whole-slide figure of a prediction (see the module docstring) and save it as PNG.

    Parameters
    ----------
    adata
        A prediction written by ``diffst predict`` (``uns['diffst']``, ``uns['spatial']``, ``obs`` rows/cols).
    genes
        Genes to draw (rows); None: the ``n_genes`` with the highest mean prediction.
    path
        PNG file to write (atomically).
    sample
        Which sample; None: the first.
    n_genes
        Number of genes when ``genes`` is None.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        If a gene or the sample is missing, or the AnnData is not a Diff-ST prediction.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from diffst.atomic import atomic_output

    if "diffst" not in adata.uns:
        raise InputError("This AnnData is not a Diff-ST prediction (no uns['diffst']); write one with diffst predict.")
    names = list(map(str, adata.var_names))
    if genes is None:
        order = np.argsort(-np.asarray(adata.X.mean(axis=0)).ravel(), kind="stable")
        genes = [names[i] for i in order[:n_genes]]
    missing = [g for g in genes if g not in names]
    if missing:
        raise InputError(f"Gene(s) {missing} are not in the prediction; choose from {names[:10]}...")
    sample = sample if sample is not None else str(adata.obs["sample"].iloc[0])
    geometry = adata.uns["diffst"]["geometry"]
    bin_um, scale = float(geometry["hr_bin_um"]), int(geometry["scale"])
    answer, origin = region_maps(adata, sample)
    panels = {"LR spots": _spot_blocks(answer, scale), "Diff-ST": answer}
    if "std" in adata.layers:
        panels["std"] = region_maps(adata, sample, "std")[0]
    if "observed" in adata.layers:
        panels["observed"] = region_maps(adata, sample, "observed")[0]
    spatial = adata.uns.get("spatial", {}).get(sample)
    cols = 1 + len(panels)
    fig = Figure(figsize=(2.5 * cols, 2.3 * len(genes) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(len(genes), cols, squeeze=False))
    height, width = answer.shape[1:]
    for r, gene in enumerate(genes):
        g = names.index(gene)
        _histology(axes[r, 0], spatial, adata, sample, origin, bin_um, (height, width))
        reference = panels.get("observed", answer)[g]
        vmax = float(np.nanpercentile(reference, 99)) or 1.0
        for c, (name, maps) in enumerate(panels.items(), start=1):
            ax = axes[r, c]
            own_scale = name in ("LR spots", "std")
            im = ax.imshow(maps[g], cmap="magma", vmin=0, vmax=None if own_scale else vmax, interpolation="nearest")
            label = "counts / spot" if name == "LR spots" else "counts / bin"
            fig.colorbar(im, ax=ax, shrink=0.8).set_label(label, fontsize=6)
            ax.set_title(f"{gene}: {name}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            _scale_bar(ax, bin_um, width)
    fig.suptitle(f"{sample}: {bin_um:g} µm bins, {scale}x super-resolution", fontsize=9)
    path = Path(path)
    with atomic_output(path, directory=False) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _histology(ax, spatial: dict | None, adata: Any, sample: str, origin: tuple[float, float], bin_um: float,
               shape: tuple[int, int]) -> None:
    """Draw the hires histology cropped to the predicted region, in HR-bin units (so scale bars agree)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("histology", fontsize=8)
    if not spatial or "images" not in spatial:
        ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7)
        return
    image = np.asarray(spatial["images"]["hires"])
    scalef = float(spatial["scalefactors"]["tissue_hires_scalef"])
    # Micron -> hires pixel: the bins' full-resolution pixel positions (obsm['spatial']) times the scale factor.
    rows_mask = np.asarray(adata.obs["sample"] == sample)
    px = np.asarray(adata.obsm["spatial"])[rows_mask] * scalef
    um = np.asarray(adata.obsm["spatial_um"])[rows_mask]
    a, *_ = np.linalg.lstsq(np.c_[um, np.ones(len(um))], px, rcond=None)  # (3, 2) affine micron -> hires px
    height, width = shape
    corners = np.array([[origin[0], origin[1], 1.0], [origin[0] + width * bin_um, origin[1] + height * bin_um, 1.0]]) @ a
    (x0, y0), (x1, y1) = np.floor(corners.min(axis=0)).astype(int), np.ceil(corners.max(axis=0)).astype(int)
    x0, y0 = max(x0, 0), max(y0, 0)
    crop = image[y0:y1, x0:x1]
    if crop.size == 0:
        ax.text(0.5, 0.5, "image outside the region", ha="center", va="center", fontsize=7)
        return
    ax.imshow(crop, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear")
    _scale_bar(ax, bin_um, width)
