"""The 8 square symmetries of a tile (flips and quarter turns): the training augmentation and its inverse.

Training draws one per tile (:class:`diffst.data.dataset.PreparedTiles` ``augment``); prediction can average a
model's answers over all of them (:func:`diffst.runs.regression_point`). Both act on the last two axes of
numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SYMMETRIES", "apply_symmetry", "undo_symmetry"]

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
