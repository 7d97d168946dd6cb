"""Preview figure of a prepared tile: histology, LR and HR maps of a few genes, in counts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]):
    """Make a figure with an ``nrows x ncols`` grid of axes, rendered by Agg whatever pyplot's backend is.

    Built with the object-oriented API (no pyplot), so drawing touches no global state: it neither
    selects nor changes matplotlib's backend and leaves no figure open.

    Parameters
    ----------
    nrows, ncols
        Grid of axes.
    figsize
        Width and height in inches.

    Returns
    -------
    fig : matplotlib.figure.Figure
        The figure, already attached to an Agg canvas (``fig.savefig`` writes PNG without a display).
    axes : numpy.ndarray
        Axes of shape (nrows, ncols).
    """
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def show_histology(ax, image_chw: np.ndarray, title: str = "histology") -> None:
    """Draw a (C, H, W) uint8 or [0, 1] image: RGB as is, one channel in grey.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw; its frame and ticks are hidden.
    image_chw
        The image, channels first (1 or >= 3 channels; only the first 3 are shown).
    title
        Axes title.
    """
    img = np.moveaxis(np.asarray(image_chw), 0, -1)
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray")
    else:
        ax.imshow(img[..., :3])
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def show_map(ax, values: np.ndarray, title: str, fig, vmax: float | None = None, label: str = "counts") -> None:
    """Draw one gene map with its own colour bar.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    values
        (H, W) map; NaN is left blank.
    title
        Axes title.
    fig : matplotlib.figure.Figure
        The figure of ``ax`` (for the colour bar).
    vmax
        Top of the colour scale; None = the map's maximum. The bottom is 0.
    label
        Colour bar label (the unit).
    """
    im = ax.imshow(values, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label(label, fontsize=7)


def plot_tile_preview(tile, genes: Sequence[str], path: str | Path, n_show: int = 3, normaliser=None) -> Path:
    """Save histology / LR / HR side by side for the ``n_show`` most expressed genes of a tile.

    LR is in counts per LR bin (s x s HR bins), HR in counts per HR bin; HR is omitted for spot-only data.

    Parameters
    ----------
    tile
        A prepared tile (``tissue``, ``lr_counts``, ``lr_mask``, ``hr_counts`` or None, ``geometry``).
    genes
        Gene names, in the order of the tile's maps.
    path
        PNG file to write.
    n_show
        Number of genes (rows) shown, the most expressed first.
    normaliser
        Unused; accepted for callers that pass one.

    Returns
    -------
    Path
        ``path``.
    """
    lr = tile.lr_counts
    hr = tile.hr_counts
    order = np.argsort(-(hr if hr is not None else lr).sum(axis=(1, 2)), kind="stable")[:n_show]
    cols = 3 if hr is not None else 2
    fig, axes = new_figure(len(order), cols, figsize=(3.4 * cols, 3.0 * len(order)))
    geom = tile.geometry
    x0, y0, _, _ = geom.bounds_um()
    for row, g in enumerate(order):
        show_histology(axes[row, 0], tile.tissue, f"histology ({x0:.0f}, {y0:.0f}) µm")
        lr_map = np.where(tile.lr_mask, lr[g], np.nan)
        show_map(axes[row, 1], lr_map, f"{genes[g]} LR {geom.lr_bin_um:g} µm", fig, label="counts / LR bin")
        if hr is not None:
            show_map(axes[row, 2], hr[g], f"{genes[g]} HR {geom.hr_bin_um:g} µm", fig, label="counts / HR bin")
    fig.suptitle(f"Tile {geom.tile_um:g} µm, s = {geom.scale}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
