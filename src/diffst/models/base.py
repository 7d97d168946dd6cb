"""What every denoiser takes and returns.

Models know nothing about the diffusion process: they map (noisy HR maps, timestep, conditions) to a
prediction, plus any auxiliary losses of their own.

The call is ``model(x_t, t, **conditions)``, with ``conditions`` a :class:`Conditions` (a read-only
mapping of the keyword conditions, so ``**`` unpacks it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["DenoiserOutput", "Conditions", "Denoiser", "regress"]


@dataclass
class DenoiserOutput:
    """Output of a denoiser's forward pass.

    prediction: (B, N, H, W) epsilon, or (B, 2N, H, W) when the model also predicts the variance
        interpolation values v (learned sigma): the first N channels are epsilon, the last N are v.
    aux_losses: unweighted auxiliary losses of the model itself (e.g. ``"disentangle"``); the training
        loop weights them.
    """

    prediction: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


_NAMES = ("lr", "tissue", "cells", "cell_entropy", "entropy_threshold")


@dataclass(frozen=True, eq=False)
class Conditions(Mapping[str, Any]):
    """The conditions of a denoiser call, for a batch of B tiles.

    A read-only mapping of the model's keyword conditions: ``model(x_t, t, **conditions)``.

    Attributes
    ----------
    lr
        (B, N, h, w) LR maps in model space.
    tissue
        (B, C, S, S) histology image in [0, 1].
    cells
        (B, M, C, p, p) cell-level patches in [0, 1], or None.
    cell_entropy
        (B, M) entropy of each patch, or None.
    entropy_threshold
        Curriculum gamma: only patches with a higher entropy are attended; None uses every patch.
    """

    lr: Tensor
    tissue: Tensor
    cells: Tensor | None = None
    cell_entropy: Tensor | None = None
    entropy_threshold: float | None = None

    @classmethod
    def from_batch(cls, batch: Mapping[str, Tensor], entropy_threshold: float | None = None) -> Conditions:
        """Build the conditions of a dataset batch (a dict with ``lr``, ``tissue``, ``cells``, ``cell_entropy``).

        Parameters
        ----------
        batch
            One item or a collated batch of :class:`~diffst.data.dataset.PreparedTiles`; other keys
            (``hr``, ``lr_mask``, ``index``) are ignored.
        entropy_threshold
            Curriculum gamma (None: every cell patch).

        Returns
        -------
        Conditions
            Holding the batch's tensors (not copied, not moved).
        """
        return cls(lr=batch["lr"], tissue=batch["tissue"], cells=batch.get("cells"),
                   cell_entropy=batch.get("cell_entropy"), entropy_threshold=entropy_threshold)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Conditions:
        """Return the same conditions with every tensor on ``device``.

        Parameters
        ----------
        device
            Target device.
        non_blocking
            Passed to ``Tensor.to``.

        Returns
        -------
        Conditions
        """
        moved = {k: v.to(device, non_blocking=non_blocking) for k in _NAMES[:4] if (v := getattr(self, k)) is not None}
        return replace(self, **moved)

    def __getitem__(self, key: str) -> Any:
        if key not in _NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)


class Denoiser(Protocol):
    """The interface every denoiser offers (Diff-ST, the Guided-DM baseline, any registered model).

    A model without a gene graph may inherit from this protocol to get the default
    :meth:`set_coexpression`, which ignores the matrix.
    """

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        lr: Tensor,
        tissue: Tensor,
        cells: Tensor | None = None,
        cell_entropy: Tensor | None = None,
        entropy_threshold: float | None = None,
    ) -> DenoiserOutput:
        """Predict from noisy HR maps ``x_t`` (B, N, H, W) at timesteps ``t`` (B,) and the conditions.

        Returns
        -------
        DenoiserOutput
            The prediction (B, N or 2N, H, W) and the model's auxiliary losses.
        """
        ...

    def set_coexpression(self, matrix: np.ndarray | Tensor) -> None:
        """Take the (N, N) gene co-expression matrix of the training split.

        Parameters
        ----------
        matrix
            From :func:`~diffst.models.graph.coexpression_matrix`. Training calls this once on every
            model; the default ignores it (models without a gene graph).
        """
        return None


def regress(model: Denoiser, conditions: Conditions, shape: tuple[int, ...]) -> DenoiserOutput:
    """Use a denoiser as a plain regressor: called with x_t = 0 at t = 0, it predicts the target directly.

    Parameters
    ----------
    model
        The denoiser.
    conditions
        Conditions of B tiles.
    shape
        (B, N, H, W) of the target.

    Returns
    -------
    DenoiserOutput
        ``prediction`` (B, N, H, W): the first N output channels (a learned-variance half is dropped),
        and the model's auxiliary losses.
    """
    x_t = torch.zeros(shape, device=conditions.lr.device, dtype=conditions.lr.dtype)
    t = torch.zeros(shape[0], device=conditions.lr.device, dtype=torch.long)
    out = model(x_t, t, **conditions)
    return DenoiserOutput(out.prediction[:, : shape[1]], out.aux_losses)
