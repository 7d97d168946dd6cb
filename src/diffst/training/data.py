"""Deterministic, resumable data order for training.

Every random choice of the training input pipeline is a pure function of the run seed and the position
in training, never of hidden generator state, so a run resumed from a checkpoint sees exactly the batches
(and augmentations) an uninterrupted run would have seen:

* the tile order of an epoch is a permutation drawn from ``(seed, epoch)``; it is padded by wrapping to a
  multiple of the number of processes and dealt round-robin, so every process gets the same number of
  batches and a disjoint share of the epoch (up to the padding);
* resuming at step ``s`` means epoch ``s // steps_per_epoch``, skipping the first
  ``s % steps_per_epoch`` batches of it (without loading them);
* the augmentation of a tile is drawn from ``(seed, epoch, tile)``;
* timesteps, noise and dropout of a step are drawn from ``(seed, rank, step)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffst.config import ConfigError, RunConfig
from diffst.errors import InputError

__all__ = ["derive_seed", "EpochOrder", "SeededTiles", "make_loader", "open_datasets", "training_tiles",
           "STREAM_ORDER", "STREAM_AUGMENT", "STREAM_NOISE", "STREAM_TORCH", "STREAM_VAL"]

# Independent random streams (the first word of every derived seed after the run seed).
STREAM_ORDER, STREAM_AUGMENT, STREAM_NOISE, STREAM_TORCH, STREAM_VAL = 1, 2, 3, 4, 5


def derive_seed(seed: int, *words: int) -> int:
    """Derive a 63-bit seed that depends on the run ``seed`` and any number of integers (e.g. stream, rank, step).

    Uses numpy's ``SeedSequence``, so nearby inputs give statistically independent streams.
    """
    state = np.random.SeedSequence([int(seed), *(int(w) for w in words)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


class EpochOrder:
    """Which tiles each process loads at each step.

    Parameters
    ----------
    tiles
        Dataset indices of the training tiles (all of them, or a subset).
    batch_size
        Tiles per batch per process.
    world_size, rank
        Number of processes and this one's index.
    seed
        Run seed.
    shuffle
        Draw a new permutation per epoch (otherwise keep ``tiles`` order).
    """

    def __init__(
        self, tiles: Sequence[int], batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
        shuffle: bool = True,
    ):
        if not tiles:
            raise ValueError("no training tiles")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.tiles = [int(i) for i in tiles]
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.per_rank = math.ceil(len(self.tiles) / self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every process (the last one may be smaller)."""
        return math.ceil(self.per_rank / self.batch_size)

    def epoch_tiles(self, epoch: int) -> list[int]:
        """Return the tiles of ``epoch`` that this process loads, in order."""
        n = len(self.tiles)
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_ORDER, epoch))
            perm = torch.randperm(n, generator=gen).tolist()
        else:
            perm = list(range(n))
        total = self.per_rank * self.world_size
        perm = (perm * math.ceil(total / n))[:total]
        return [self.tiles[p] for p in perm[self.rank :: self.world_size]]

    def batches(self, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
        """Batches of ``(epoch, tile)`` keys of ``epoch``, skipping the first ``start`` batches."""
        mine = self.epoch_tiles(epoch)
        out = [
            [(epoch, t) for t in mine[b : b + self.batch_size]] for b in range(0, len(mine), self.batch_size)
        ]
        return out[start:]


class SeededTiles(Dataset):
    """A view of a ``PreparedTiles`` dataset indexed by ``(epoch, tile)`` keys.

    Before loading a tile, the dataset's augmentation generator is re-seeded from ``(seed, epoch, tile)``,
    so the augmentation does not depend on loading order, DataLoader workers or interruptions.
    """

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, tile = key
        if getattr(self.base, "augment", False):
            # Re-seed the augmentation for this (epoch, tile), so resumed runs draw the same symmetries.
            self.base.set_rng(np.random.default_rng([self.seed, STREAM_AUGMENT, int(epoch), int(tile)]))
        return self.base[int(tile)]


def make_loader(view: SeededTiles, batches: list[list[tuple[int, int]]], num_workers: int) -> DataLoader:
    """Make a DataLoader over exactly ``batches`` (lists of ``(epoch, tile)`` keys), in order."""
    return DataLoader(view, batch_sampler=batches, num_workers=num_workers, pin_memory=torch.cuda.is_available())


def open_datasets(cfg: RunConfig):
    """Open the training split, the validation split (or None) and a note on validation for ``run_info.json``.

    Parameters
    ----------
    cfg
        The run configuration (``data`` section and ``seed``).

    Returns
    -------
    tuple
        ``(train, val or None, note)``.

    Raises
    ------
    InputError
        If ``data.path`` holds no prepared dataset or its training split has no HR ground truth.
    """
    from diffst.data.dataset import PreparedTiles

    train_ds = PreparedTiles(cfg.data.path, cfg.data.train_split, augment=cfg.data.augment, seed=cfg.seed)
    if not train_ds.has_hr:
        raise InputError(f"{cfg.data.path} split {cfg.data.train_split!r} has no HR ground truth to train on")
    val_ds, note = None, ""
    if cfg.data.val_split is None:
        note = "validation disabled (data.val_split is null)"
    else:
        try:
            val_ds = PreparedTiles(cfg.data.path, cfg.data.val_split, augment=False)
            note = f"validation on split {cfg.data.val_split!r} ({len(val_ds)} tiles)"
        except InputError:
            note = (f"no validation: the dataset has no {cfg.data.val_split!r} split (the test split is never "
                    "used for validation or model selection)")
    if val_ds is None and cfg.data.holdout_fraction:
        return _holdout_datasets(cfg, note)
    return train_ds, val_ds, note


def _holdout_datasets(cfg: RunConfig, why: str):
    """Open the training split twice: without its held-out squares (to train on), with only them (to validate)."""
    from torch.utils.data import Subset

    from diffst.data.dataset import PreparedTiles
    from diffst.data.holdout import BinHoldout
    from diffst.evaluation.report import scoring_mask

    fraction = cfg.data.holdout_fraction
    train_ds = PreparedTiles(cfg.data.path, cfg.data.train_split, augment=cfg.data.augment, seed=cfg.seed,
                             holdout=BinHoldout(fraction, cfg.seed, "rest"))
    held = PreparedTiles(cfg.data.path, cfg.data.train_split, augment=False,
                         holdout=BinHoldout(fraction, cfg.seed, "held"))
    # Validate on the tiles that hold measured held-out bins under measured spots (others would score 0).
    scored = scoring_mask(held)
    usable = (held.held_bins if scored is None else held.held_bins & scored).any(axis=(-2, -1))
    if not usable.any():
        raise InputError(f"{cfg.data.path}: no measured bin of the training tiles falls in a held-out square "
                         f"(data.holdout_fraction {fraction}); raise the fraction or set it to 0")
    n_usable = int(usable.sum())
    note = (f"{why.rstrip('.')}; validation on {fraction:.0%} of the training tissue held out from the loss "
            f"(squares one LR spot wide, in {n_usable} of {len(held)} training tiles; data.holdout_fraction)")
    return train_ds, Subset(held, np.flatnonzero(usable).tolist()), note


def training_tiles(cfg: RunConfig, n_tiles: int) -> list[int]:
    """Return the indices of the training tiles.

    Parameters
    ----------
    cfg
        The run configuration (``data.subset``).
    n_tiles
        Number of tiles of the training split.

    Returns
    -------
    list of int
        All tiles, or ``data.subset`` (repeats allowed).

    Raises
    ------
    ConfigError
        If ``data.subset`` names a tile beyond the split.
    """
    tiles = list(range(n_tiles)) if cfg.data.subset is None else list(cfg.data.subset)
    if max(tiles) >= n_tiles:
        raise ConfigError(f"data.subset has tile {max(tiles)} but the training split has {n_tiles} tiles")
    return tiles
