"""A two-stage run's frozen base prediction, computed once per training tile.

Stage two (``diffusion.target: regression_residual``) learns the residual of the HR maps over its frozen
regression run's answer. That answer is the one prediction reports: the mean over the run's seed-ensemble
members and ``sampler.point_views`` square symmetries, several network calls per tile. Asking it again at
every training step would cost those calls per step; instead it is computed once per tile (as stored, not
augmented) and turned and mirrored with the tile by the augmentation's own symmetry, so training sees the
same base as prediction does for the tile as stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from diffst.core.symmetry import SYMMETRIES, apply_symmetry
from diffst.runs import Run

__all__ = ["FrozenBase"]

#: Tiles per base-prediction call while filling the cache.
CHUNK = 8


class FrozenBase:
    """The base answer of every tile of one prepared split, all computed on first use (CPU memory, float32).

    Parameters
    ----------
    run
        The loaded base regression run (with its ensemble members, :func:`~diffst.runs.load_base_run`).
    path, split
        The prepared dataset and split whose tiles the batches' ``index`` refers to.
    views
        Square symmetries the answer is averaged over (``sampler.point_views`` of the two-stage run).

    Notes
    -----
    Memory: tiles x genes x H x W x 4 bytes (e.g. 50 MB for 200 tiles of 50 genes at 35 x 35 bins).
    """

    def __init__(self, run: Run, path: str | Path, split: str, views: int):
        from diffst.data.dataset import PreparedTiles

        self.run = run
        self.views = int(views)
        self.tiles = PreparedTiles(path, split, augment=False)
        self._answers: dict[int, torch.Tensor] = {}

    def _fill(self, device: str | torch.device) -> None:
        # Every tile, in fixed chunks: an answer must not depend on which tiles shared its network call
        # (batched float arithmetic differs in the last bits), or a resumed run would not repeat its steps.
        for start in range(0, len(self.tiles), CHUNK):
            chunk = list(range(start, min(start + CHUNK, len(self.tiles))))
            items = default_collate([self.tiles[i] for i in chunk])
            answers = self.run.predict_hr(items, device, views=self.views).float().cpu()
            self._answers.update(zip(chunk, answers, strict=True))

    def __len__(self) -> int:
        """Return the number of tiles whose answer is cached."""
        return len(self._answers)

    @torch.no_grad()
    def predict_hr(self, batch: dict[str, Any], device: str | torch.device) -> torch.Tensor:
        """Return the base answers of a batch's tiles, each under the batch's own symmetry, in model space.

        Parameters
        ----------
        batch
            A collated batch with ``index`` (tiles of this split) and ``symmetry`` (positions in
            :data:`~diffst.core.symmetry.SYMMETRIES`; missing: the identity).
        device
            Where the base run's models are and the answers go.

        Returns
        -------
        Tensor
            (B, N, H, W) model-space HR maps.
        """
        if not self._answers:
            self._fill(device)
        index = [int(i) for i in batch["index"]]
        symmetry = batch.get("symmetry")
        maps = []
        for row, tile in enumerate(index):
            turns, flip = SYMMETRIES[int(symmetry[row]) if symmetry is not None else 0]
            maps.append(apply_symmetry(self._answers[tile], turns, flip))
        return torch.stack(maps).to(device)
