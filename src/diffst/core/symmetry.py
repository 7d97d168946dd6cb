"""The 8 square symmetries of a tile (flips and quarter turns): the training augmentation and its inverse.

Training draws one per tile (:class:`diffst.data.dataset.PreparedTiles` ``augment``); prediction can average a
model's answers over all of them (:func:`diffst.runs.regression_point`). Both act on the last two axes of
numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SYMMETRIES", "apply_symmetry", "apply_symmetry_to_cells", "undo_symmetry"]

#: (quarter turns, flip) of each symmetry; the first is the identity.
SYMMETRIES = [(k, f) for f in (False, True) for k in range(4)]


def apply_symmetry(x, turns: int, flip: bool):
    """Mirror the last axis (if ``flip``), then turn the last two axes by ``turns`` quarter turns."""
    if isinstance(x, np.ndarray):
        return np.rot90(x[..., ::-1] if flip else x, turns, axes=(-2, -1))
    import torch

    return torch.rot90(torch.flip(x, dims=(-1,)) if flip else x, turns, dims=(-2, -1))


def undo_symmetry(x, turns: int, flip: bool):
    """Invert :func:`apply_symmetry`."""
    if isinstance(x, np.ndarray):
        x = np.rot90(x, -turns, axes=(-2, -1))
        return x[..., ::-1] if flip else x
    import torch

    x = torch.rot90(x, -turns, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def apply_symmetry_to_cells(cells, entropy, turns: int, flip: bool):
    """Apply a square symmetry to cell-level patches on their g x g grid, and move their entropies along.

    Parameters
    ----------
    cells
        (..., M, C, p, p) patches in row-major grid order, M = g * g (numpy array or torch tensor).
    entropy
        (..., M) entropy of each patch, or None.

    Returns
    -------
    tuple
        The patches moved to their new grid places, each patch's pixels turned too, and the entropies
        moved the same way (None stays None).
    """
    lead = cells.ndim - 4
    m = cells.shape[lead]
    g = int(round(m ** 0.5))
    move = np.moveaxis if isinstance(cells, np.ndarray) else (lambda x, a, b: x.movedim(a, b))
    grid = cells.reshape(*cells.shape[:lead], g, g, *cells.shape[lead + 1 :])
    grid = move(apply_symmetry(move(grid, (lead, lead + 1), (-2, -1)), turns, flip), (-2, -1), (lead, lead + 1))
    moved = apply_symmetry(grid, turns, flip).reshape(cells.shape)  # pixels inside each patch
    if entropy is not None:
        entropy = apply_symmetry(entropy.reshape(*entropy.shape[:-1], g, g), turns, flip).reshape(entropy.shape)
    return moved, entropy
