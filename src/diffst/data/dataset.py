"""Torch dataset over a prepared folder (see :mod:`diffst.data.prepare` for the format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from diffst.core.geometry import TileGeometry
from diffst.core.symmetry import SYMMETRIES, apply_symmetry, apply_symmetry_to_cells
from diffst.data.holdout import BinHoldout, holdout_bins
from diffst.data.normalise import LogScaleNormaliser
from diffst.data.prepare import load_meta
from diffst.errors import InputError


def _tensor(a: np.ndarray, dtype=None) -> torch.Tensor:
    """Return a tensor of its own memory, C-ordered with positive strides.

    ``np.ascontiguousarray`` keeps a flipped view of an axis of length one (a 1 x 1 LR map) as it is, with
    a negative stride torch cannot take, so the array is copied.
    """
    return torch.from_numpy(np.array(a, dtype=dtype, order="C", copy=True))


def describe_gene_mismatch(model_genes: list[str], data_genes: list[str]) -> str:
    """Say which genes differ between a model and a dataset (missing, extra, or the same set reordered)."""
    missing = [g for g in model_genes if g not in data_genes]
    extra = [g for g in data_genes if g not in model_genes]

    def show(genes: list[str]) -> str:
        return ", ".join(genes[:10]) + (f" and {len(genes) - 10} more" if len(genes) > 10 else "")

    if missing or extra:
        parts = [f"the model's genes {show(missing)} are not in the dataset"] if missing else []
        parts += [f"the dataset's genes {show(extra)} are not in the model"] if extra else []
        return "Gene lists differ: " + "; ".join(parts) + "."
    if len(model_genes) != len(data_genes):
        return f"Gene lists differ in length ({len(model_genes)} for the model, {len(data_genes)} in the dataset)."
    first = next(i for i, (a, b) in enumerate(zip(model_genes, data_genes, strict=True)) if a != b)
    return (f"Same genes in a different order: position {first} is {model_genes[first]} for the model but "
            f"{data_genes[first]} in the dataset.")


class PreparedTiles(Dataset):
    """Tiles of one split of a prepared dataset, in model space.

    Each item is a dict of float32 tensors: ``lr`` (N, h, w) and, when the dataset has HR ground
    truth, ``hr`` (N, H, W), both in the normaliser's model space, with ``hr_mask`` (H, W) (bool: the
    HR bins that were measured; all True for point data, the bins holding a spot in the self-supervised
    mode); ``lr_mask`` (h, w); ``tissue``
    (C, S, S) and ``cells`` (M, C, p, p) in [0, 1]; ``cell_entropy`` (M,); ``index``; and ``symmetry``, the
    position in :data:`~diffst.core.symmetry.SYMMETRIES` of the symmetry applied (0, the identity, without
    augmentation).
    ``normaliser`` overrides the dataset's own (use the trained model's when predicting). ``holdout``
    (:class:`~diffst.data.holdout.BinHoldout`) hides held-out squares of the tissue from ``hr_mask`` (the
    training view) or leaves only them (the validation view): model selection without a validation split.
    With ``augment=True`` one of the 8 square symmetries (flips, 90-degree rotations) is drawn per
    item and applied identically to every modality: to the maps, to the tissue image, and to the
    cell grid as well as to each cell patch (with its entropy moved along).
    Arrays are memory-mapped, so opening a dataset costs no RAM.
    """

    def __init__(self, path: str | Path, split: str = "train", augment: bool = False, seed: int = 0,
                 normaliser: LogScaleNormaliser | None = None, holdout: BinHoldout | None = None):
        self.path = Path(path)
        self.meta = load_meta(self.path)
        if split not in ("train", "val", "test"):
            raise InputError(f"Unknown split '{split}'; choose train, val or test.")
        folder = self.path / split
        if not folder.is_dir():
            raise InputError(
                f"Prepared dataset {self.path} has no '{split}' tiles (it has {self.meta['n_tiles']}). "
                "Choose another split or prepare with a held-out region / samples."
            )
        self.split = split
        self.geometry = TileGeometry(**self.meta["geometry"])
        self.genes: list[str] = self.meta["genes"]
        # A model trained elsewhere brings its own normaliser: its model space is the one that counts.
        self.normaliser = normaliser or LogScaleNormaliser(**self.meta["normaliser"])
        if self.normaliser.genes != self.genes:
            raise InputError(f"{describe_gene_mismatch(self.normaliser.genes, self.genes)} Prepare the dataset with "
                             f"the model's gene list: --genes {','.join(self.normaliser.genes)}")
        self.has_hr = bool(self.meta["has_hr"])

        def load(name: str) -> np.ndarray:
            try:
                return np.load(folder / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(f"{folder / name}.npy is missing or corrupt ({exc}); prepare the dataset again.") from exc

        self.lr_counts = load("lr_counts")
        self.lr_mask = load("lr_mask")
        self.hr_counts = load("hr_counts") if self.has_hr else None
        self.hr_mask = None
        if self.has_hr:
            if (folder / "hr_mask.npy").exists() or self.meta.get("format_version", 1) >= 2:
                self.hr_mask = load("hr_mask")
            else:  # format v1: HR came from transcripts only, every bin measured
                self.hr_mask = np.ones((len(self.hr_counts), *self.hr_counts.shape[-2:]), dtype=bool)
            if self.hr_mask.shape != (len(self.hr_counts), *self.hr_counts.shape[-2:]):
                raise InputError(f"{folder}: hr_mask has shape {self.hr_mask.shape} but hr_counts "
                                 f"{self.hr_counts.shape}; the folder is inconsistent. Prepare the dataset again.")
        self.self_supervised = bool(self.meta.get("self_supervised", False))
        self.tissue = load("tissue")
        self.cells = load("cells")
        self.cell_entropy = load("cell_entropy")
        n = len(self.lr_counts)
        for name, arr in (("tissue", self.tissue), ("cells", self.cells), ("cell_entropy", self.cell_entropy)):
            if len(arr) != n:
                raise InputError(f"{folder}: {name} has {len(arr)} tiles but lr_counts has {n}; the folder is inconsistent.")
        try:
            table = pd.read_csv(self.path / "tiles.csv")
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.path / 'tiles.csv'} is missing or corrupt ({exc}); prepare the dataset again.") from exc
        self.tiles = table[table["split"] == split].sort_values("index").reset_index(drop=True)
        self.holdout = holdout
        self.held_bins = None
        if holdout is not None:
            if not self.has_hr:
                raise InputError(f"{folder}: a held-out share of the bins needs HR ground truth; this split has none")
            self.held_bins = holdout_bins(self.tiles, self.geometry, holdout.fraction, holdout.seed)
        self.augment = augment
        self._rng = np.random.default_rng(seed)

    def set_rng(self, rng: np.random.Generator) -> None:
        """Use ``rng`` for the next augmentation draws (training re-seeds it per epoch and tile)."""
        self._rng = rng

    def __len__(self) -> int:
        return len(self.lr_counts)

    @property
    def image_channels(self) -> int:
        """Channels of the histology image (3 RGB, 1 DAPI, ...)."""
        return int(self.tissue.shape[1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        scale = self.geometry.scale
        lr = self.normaliser.lr_to_model(np.array(self.lr_counts[i], dtype=np.float32), scale)
        mask = np.array(self.lr_mask[i])
        tissue = np.asarray(self.tissue[i], dtype=np.float32) / 255.0
        cells = np.asarray(self.cells[i], dtype=np.float32) / 255.0
        entropy = np.array(self.cell_entropy[i], dtype=np.float32)
        hr = hr_mask = None
        if self.has_hr:
            hr = self.normaliser.to_model(np.array(self.hr_counts[i], dtype=np.float32))
            hr_mask = np.array(self.hr_mask[i], dtype=bool)
            if self.held_bins is not None:
                hr_mask &= self.held_bins[i] if self.holdout.keep == "held" else ~self.held_bins[i]
        symmetry = int(self._rng.integers(len(SYMMETRIES))) if self.augment else 0  # 0: the identity
        if symmetry:
            k, flip = SYMMETRIES[symmetry]
            lr, mask, tissue = apply_symmetry(lr, k, flip), apply_symmetry(mask, k, flip), apply_symmetry(tissue, k, flip)
            if hr is not None:
                hr, hr_mask = apply_symmetry(hr, k, flip), apply_symmetry(hr_mask, k, flip)
            cells, entropy = apply_symmetry_to_cells(cells, entropy, k, flip)
        item = {
            "lr": _tensor(lr, np.float32),
            "lr_mask": _tensor(mask),
            "tissue": _tensor(tissue),
            "cells": _tensor(cells),
            "cell_entropy": _tensor(entropy),
            "index": torch.tensor(i),
            "symmetry": torch.tensor(symmetry),
        }
        if hr is not None:
            item["hr"] = _tensor(hr, np.float32)
            item["hr_mask"] = _tensor(hr_mask)
        return item
