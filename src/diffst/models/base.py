"""What every denoiser takes and returns.

Models know nothing about the diffusion process: they map (noisy HR maps, timestep, conditions) to a
prediction, plus any auxiliary losses of their own.

The call is ``model(x_t, t, **conditions)``, with ``conditions`` a :class:`Conditions` (a read-only
mapping of the keyword conditions, so ``**`` unpacks it).

A model whose condition branch does not depend on x_t or t may also offer ``encode_conditions(hr_size,
**conditions) -> EncodedConditions`` and ``forward_encoded(x_t, t, encoded) -> DenoiserOutput``: a sampler
then encodes the conditions once per tile instead of once per step (:func:`bind_conditions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from diffst.core.symmetry import apply_symmetry, apply_symmetry_to_cells

__all__ = ["DenoiserOutput", "Conditions", "EncodedConditions", "Denoiser", "bind_conditions", "regress"]


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

    def repeat(self, times: int) -> Conditions:
        """Return the conditions of ``times`` copies of the batch, one copy after another.

        Parameters
        ----------
        times
            Number of copies (K samples of the same B tiles as one batch of K * B).

        Returns
        -------
        Conditions
            Tensors of batch ``times * B``: item ``j * B + i`` is tile i.
        """
        if times == 1:
            return self
        tiled = {k: v.repeat(times, *([1] * (v.ndim - 1))) for k in _NAMES[:4] if (v := getattr(self, k)) is not None}
        return replace(self, **tiled)

    def symmetry(self, turns: int, flip: bool) -> Conditions:
        """Return the conditions of the same tiles seen under a square symmetry (as the training augmentation).

        Parameters
        ----------
        turns
            Quarter turns (``torch.rot90`` over the last two axes), applied after the flip.
        flip
            Mirror the last axis first.

        Returns
        -------
        Conditions
            Maps and image turned; cell patches moved on their grid and each patch turned, entropies moved
            along. Undo on an HR map with :func:`~diffst.core.symmetry.undo_symmetry`.
        """
        moved: dict[str, Tensor] = {"lr": apply_symmetry(self.lr, turns, flip),
                                    "tissue": apply_symmetry(self.tissue, turns, flip)}
        if self.cells is not None:
            moved["cells"], entropy = apply_symmetry_to_cells(self.cells, self.cell_entropy, turns, flip)
            if entropy is not None:
                moved["cell_entropy"] = entropy
        return replace(self, **moved)

    def __getitem__(self, key: str) -> Any:
        if key not in _NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)


@dataclass(frozen=True, eq=False)
class EncodedConditions:
    """A model's encoding of the conditions of B tiles: what its forward needs besides x_t and t.

    Made by a model's ``encode_conditions`` and read only by the same model's ``forward_encoded``; the
    samplers just carry it from one step to the next.

    Attributes
    ----------
    features
        Named tensors, each with the batch on its first axis (what they are is the model's business).
    aux_losses
        The auxiliary losses of the condition branch (e.g. ``"disentangle"``).
    """

    features: dict[str, Tensor]
    aux_losses: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """The number B of tiles encoded."""
        return next(iter(self.features.values())).shape[0]

    def repeat(self, times: int) -> EncodedConditions:
        """Return the encoding of ``times`` copies of the batch, one copy after another (see :meth:`Conditions.repeat`)."""
        if times == 1:
            return self
        tiled = {k: v.repeat(times, *([1] * (v.ndim - 1))) for k, v in self.features.items()}
        return EncodedConditions(tiled, self.aux_losses)


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


def bind_conditions(model: Any, conditions: Conditions, hr_size: tuple[int, int]) -> Callable[[Tensor, Tensor], DenoiserOutput]:
    """Bind the conditions of B tiles to a denoiser: ``denoise(x_t, t)`` for the samplers.

    A model with ``encode_conditions`` / ``forward_encoded`` (Diff-ST) encodes the conditions here, once,
    instead of at every sampler step; other models are called as ``model(x_t, t, **conditions)``. A batch
    of x_t that holds r copies of the B tiles (r * B maps, copy after copy, e.g. K samples at once) gets
    the conditions repeated r times.

    Parameters
    ----------
    model
        The denoiser (in eval mode for sampling; the encoding is made under the caller's grad mode).
    conditions
        The conditions of B tiles.
    hr_size
        (H, W) of the HR maps the denoiser will be called on.

    Returns
    -------
    callable
        ``denoise(x_t, t) -> DenoiserOutput`` for x_t of shape (r * B, N, H, W).
    """
    batch = conditions.lr.shape[0]
    encode = getattr(model, "encode_conditions", None)
    encoded = encode(tuple(hr_size), **conditions) if encode is not None else None
    repeated: dict[int, Any] = {}

    def copies(x_t: Tensor) -> int:
        if x_t.shape[0] % batch:
            raise ValueError(f"x_t holds {x_t.shape[0]} maps, not a multiple of the {batch} tiles bound")
        return x_t.shape[0] // batch

    def denoise(x_t: Tensor, t: Tensor) -> DenoiserOutput:
        times = copies(x_t)
        if times not in repeated:  # the sampler calls with one batch size: repeat once, not per step
            repeated[times] = encoded.repeat(times) if encoded is not None else conditions.repeat(times)
        if encoded is not None:
            return model.forward_encoded(x_t, t, repeated[times])
        return model(x_t, t, **repeated[times])

    return denoise


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
