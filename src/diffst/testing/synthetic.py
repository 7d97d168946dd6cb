"""A small synthetic slide: cells with transcripts in microns and an H&E-like image in the same frame.

For tests of geometry, scale, tiling and I/O only. The expression model is a toy (types with marker
genes, a few co-expressed modules, Poisson counts); it says nothing about real tissue, and no
accuracy claim may rest on it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from diffst.core.image import SlideImage
from diffst.core.sample import Sample
from diffst.errors import InputError

_BACKGROUND = np.array([238, 196, 218], dtype=np.float32)  # pale pink stroma
_CYTOPLASM = np.array([226, 160, 200], dtype=np.float32)  # eosin-pink cytoplasm
_NUCLEUS = np.array([88, 52, 140], dtype=np.float32)  # haematoxylin purple


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field of ``shape`` (correlation length ~ sigma pixels)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(sigma, 0.5), mode="wrap")
    std = field.std()
    return (field - field.mean()) / (std if std > 0 else 1.0)


def synthetic_slide(
    width_um: float,
    height_um: float,
    *,
    n_genes: int = 12,
    n_cell_types: int = 3,
    cell_diameter_um: float = 12.0,
    pixel_size_um: float = 0.5,
    seed: int = 0,
) -> Sample:
    """Generate a synthetic tissue section: cells, point transcripts and an H&E-like image.

    For tests of geometry and scale only (placement, binning, tiling, readers), never for accuracy
    claims: the expression model is a toy.

    Model. The slide is split into ``n_cell_types`` spatial domains (Voronoi regions of random
    centres); each domain is dominated (70 %) by one cell type. Cells sit on a jittered grid (spacing
    ~1.15 cell diameters, some left empty). Each type has its own marker genes; the remaining genes
    form co-expressed modules driven by a smooth spatial field shared by the module's genes. Counts
    per cell and gene are Poisson; each transcript is placed uniformly inside its cell's disc. The
    image (uint8 RGB) is pale pink stroma, pink cytoplasm discs and purple nuclei whose radius and
    darkness depend on the cell type; pixel (0, 0) is at micron (0, 0).

    Parameters
    ----------
    width_um, height_um
        Slide size in microns; the image has ``round(size / pixel_size_um)`` pixels per side.
    n_genes, n_cell_types
        Panel size and number of cell types (= number of domains).
    cell_diameter_um, pixel_size_um
        Cell size and image resolution.
    seed
        Everything is reproducible from it.

    Returns
    -------
    Sample
        ``platform`` "synthetic"; ``transcripts`` with ``gene`` (int32), ``x_um``, ``y_um``,
        ``cell_id``, ``overlaps_nucleus``; ``genes`` named ``T<k>_marker<j>`` and ``M<k>_gene<j>``;
        ``image``: :class:`SlideImage` at ``pixel_size_um``; ``meta``: ``cells`` (DataFrame with
        ``cell_id, x_um, y_um, cell_type, domain, nucleus_radius_um``), ``markers`` (type -> gene
        indices), ``modules`` (module -> gene indices), ``rates`` (cells x genes Poisson means),
        ``seed``.
    """
    if not (np.isfinite(width_um) and np.isfinite(height_um)) or width_um <= 0 or height_um <= 0:
        raise InputError(f"Slide size {width_um} x {height_um} µm; expected positive widths in microns.")
    if pixel_size_um <= 0 or cell_diameter_um <= 0:
        raise InputError(
            f"pixel_size_um={pixel_size_um}, cell_diameter_um={cell_diameter_um}; both must be positive microns."
        )
    if n_cell_types < 1 or n_genes < n_cell_types:
        raise InputError(f"n_genes={n_genes}, n_cell_types={n_cell_types}; need n_genes >= n_cell_types >= 1.")
    rng = np.random.default_rng(seed)
    radius = cell_diameter_um / 2.0

    # ---- genes: markers per type, then modules of co-expressed genes
    n_markers = max(1, n_genes // (2 * n_cell_types))
    genes: list[str] = []
    markers: dict[int, list[int]] = {}
    for t in range(n_cell_types):
        markers[t] = list(range(len(genes), len(genes) + n_markers))
        genes += [f"T{t}_marker{j}" for j in range(n_markers)]
    rest = n_genes - len(genes)
    modules: dict[int, list[int]] = {}
    n_modules = max(1, rest // 3) if rest else 0
    for j in range(rest):
        m = j % n_modules
        modules.setdefault(m, []).append(len(genes))
        genes.append(f"M{m}_gene{len(modules[m]) - 1}")

    # ---- domains and cells
    domain_centres = rng.uniform([0, 0], [width_um, height_um], size=(n_cell_types, 2))
    spacing = 1.15 * cell_diameter_um
    gx = np.arange(spacing / 2, max(width_um, spacing / 2 + 1e-9), spacing)
    gy = np.arange(spacing / 2, max(height_um, spacing / 2 + 1e-9), spacing)
    cx, cy = np.meshgrid(gx, gy)
    xy = np.column_stack([cx.ravel(), cy.ravel()])
    xy = xy + rng.uniform(-0.07, 0.07, size=xy.shape) * cell_diameter_um
    xy[:, 0] = np.clip(xy[:, 0], min(radius, width_um / 2), max(width_um - radius, width_um / 2))
    xy[:, 1] = np.clip(xy[:, 1], min(radius, height_um / 2), max(height_um - radius, height_um / 2))
    domain = np.argmin(((xy[:, None, :] - domain_centres[None]) ** 2).sum(-1), axis=1)
    keep = rng.random(len(xy)) < 0.55 + 0.4 * (domain + 1) / n_cell_types
    xy, domain = xy[keep], domain[keep]
    n_cells = len(xy)
    dominant = rng.random(n_cells) < 0.7
    cell_type = np.where(dominant, domain, rng.integers(0, n_cell_types, n_cells))
    nucleus_frac = np.linspace(0.3, 0.5, n_cell_types) if n_cell_types > 1 else np.array([0.4])
    nucleus_radius = radius * nucleus_frac[cell_type] * rng.uniform(0.9, 1.1, n_cells)

    # ---- expression: base + markers + module fields, Poisson counts per cell
    rates = np.full((n_cells, n_genes), 0.3)
    for t, idx in markers.items():
        rates[np.ix_(cell_type == t, idx)] += 6.0
    if modules:
        coarse = (max(2, int(np.ceil(height_um / 50))), max(2, int(np.ceil(width_um / 50))))
        cr = np.clip((xy[:, 1] / 50).astype(int), 0, coarse[0] - 1)
        cc = np.clip((xy[:, 0] / 50).astype(int), 0, coarse[1] - 1)
        for idx in modules.values():
            field = _smooth_field(rng, coarse, sigma=2.0)[cr, cc]
            activity = 3.0 * np.exp(field + 0.3 * rng.standard_normal(n_cells))
            for g in idx:
                rates[:, g] += activity * rng.uniform(0.6, 1.4)
    counts = rng.poisson(rates)
    per_cell = counts.sum(axis=1)
    cell_of = np.repeat(np.arange(n_cells), per_cell)
    gene_of = np.concatenate([np.repeat(np.arange(n_genes), row) for row in counts]) if n_cells else np.zeros(0, int)
    r = radius * np.sqrt(rng.random(len(cell_of)))
    angle = rng.uniform(0, 2 * np.pi, len(cell_of))
    tx_x = np.clip(xy[cell_of, 0] + r * np.cos(angle), 0.0, np.nextafter(width_um, 0))
    tx_y = np.clip(xy[cell_of, 1] + r * np.sin(angle), 0.0, np.nextafter(height_um, 0))
    transcripts = pd.DataFrame(
        {
            "gene": gene_of.astype(np.int32),
            "x_um": tx_x,
            "y_um": tx_y,
            "cell_id": cell_of.astype(np.int64),
            "overlaps_nucleus": (r <= nucleus_radius[cell_of]).astype(np.int8),
        }
    )

    image = _render_he(rng, width_um, height_um, pixel_size_um, xy, radius, nucleus_radius, cell_type, n_cell_types)
    cells = pd.DataFrame(
        {"cell_id": np.arange(n_cells), "x_um": xy[:, 0], "y_um": xy[:, 1], "cell_type": cell_type,
         "domain": domain, "nucleus_radius_um": nucleus_radius}
    )
    return Sample(
        name=f"synthetic_seed{seed}",
        genes=genes,
        image=SlideImage(image, pixel_size_um=pixel_size_um),
        transcripts=transcripts,
        platform="synthetic",
        meta={"cells": cells, "markers": markers, "modules": modules, "rates": rates, "seed": seed,
              "size_um": (float(width_um), float(height_um))},
    )


def _render_he(rng, width_um, height_um, px, xy, radius, nucleus_radius, cell_type, n_types) -> np.ndarray:
    """Paint the H&E-like RGB uint8 image: stroma texture, cytoplasm discs, nuclei."""
    rows = max(1, int(round(height_um / px)))
    cols = max(1, int(round(width_um / px)))
    # Stroma texture: a coarse smooth field upsampled (cheap for any image size).
    step = max(1, int(round(8.0 / px)))
    coarse = _smooth_field(rng, (rows // step + 2, cols // step + 2), sigma=1.5).astype(np.float32)
    texture = ndimage.zoom(coarse, step, order=1)[:rows, :cols]
    img = _BACKGROUND[None, None, :] + 8.0 * texture[..., None] * np.array([1.0, 1.6, 1.0], dtype=np.float32)
    darkness = np.linspace(0.8, 1.0, n_types) if n_types > 1 else np.array([1.0])
    r_px = radius / px
    for (x, y), nr, t in zip(xy, nucleus_radius, cell_type, strict=True):
        c, rr = x / px, y / px
        c0, c1 = max(int(np.floor(c - r_px)), 0), min(int(np.ceil(c + r_px)) + 1, cols)
        r0, r1 = max(int(np.floor(rr - r_px)), 0), min(int(np.ceil(rr + r_px)) + 1, rows)
        if c1 <= c0 or r1 <= r0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1]
        d2 = ((xx + 0.5 - c) ** 2 + (yy + 0.5 - rr) ** 2) * (px * px)
        window = img[r0:r1, c0:c1]
        window[d2 <= radius**2] = _CYTOPLASM
        nucleus_colour = _BACKGROUND - (_BACKGROUND - _NUCLEUS) * darkness[t]
        window[d2 <= nr**2] = nucleus_colour
    img += rng.normal(0.0, 4.0, size=(1, 1, 3)).astype(np.float32)  # slide-level stain shift
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
