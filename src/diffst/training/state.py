"""The train state: what a checkpoint saves and restores (step, model, EMA, optimiser)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from diffst.config import RunConfig
from diffst.runs import build_run_model
from diffst.training.checkpoint import restore_rng
from diffst.training.ema import EMA

__all__ = ["TrainState"]

log = logging.getLogger("diffst.training")


@dataclass
class TrainState:
    """Step, weights, EMA and optimiser of a run in progress.

    Attributes
    ----------
    step
        Optimiser steps taken.
    model
        The live denoiser (unwrapped: its ``state_dict`` is what a checkpoint stores).
    wrapped
        The same model as prepared by Accelerate (DistributedDataParallel with several processes): call this
        one in training steps so gradients are synchronised.
    ema
        Exponential moving average of the weights (the model inference uses).
    optimizer
        AdamW, as prepared by Accelerate.
    """

    step: int
    model: nn.Module
    wrapped: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer

    @classmethod
    def create(cls, cfg: RunConfig, coexpression: np.ndarray, accelerator: Any,
               checkpoint: dict[str, Any] | None = None, linear_prior: dict[str, Any] | None = None) -> TrainState:
        """Create a new train state (weights seeded from ``cfg.seed``), or restore the one ``checkpoint`` saved.

        Parameters
        ----------
        cfg
            The resolved run configuration (model, optimiser and EMA settings).
        coexpression
            Co-expression matrix of the training split, given to the model (:class:`~diffst.models.base.Denoiser`).
        accelerator
            The ``accelerate.Accelerator`` of the run: places and wraps the model and the optimiser.
        checkpoint
            From :func:`diffst.runs.read_training_state`: weights, EMA, optimiser, step and (main process)
            random states are restored.
        linear_prior
            Fitted coefficients of a spot-ratio model's linear prior (``train.linear_prior``), set before the
            EMA copy is made; a checkpoint carries them in its weights.

        Returns
        -------
        TrainState
        """
        torch.manual_seed(cfg.seed)
        model = build_run_model(cfg)
        model.set_coexpression(coexpression)
        if linear_prior is not None:
            model.set_linear_prior(linear_prior)
        train = cfg.train
        optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                                      weight_decay=train.weight_decay)
        ema = EMA(model, train.ema_decay, train.ema_warmup)
        step = 0
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            ema.load_state_dict(checkpoint["ema"], checkpoint["state"]["ema_updates"])
            step = int(checkpoint["state"]["step"])
            if accelerator.is_main_process:
                restore_rng(checkpoint["rng"])
            saved_world = checkpoint["state"].get("world_size")
            if saved_world != accelerator.num_processes:
                log.warning("resuming with %d processes instead of %s: the data order changes",
                            accelerator.num_processes, saved_world)
        ema.model.to(accelerator.device)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        return cls(step, accelerator.unwrap_model(wrapped), wrapped, ema, optimizer)

    def update(self, accelerator: Any, loss: torch.Tensor, grad_clip: float | None) -> float | None:
        """Back-propagate ``loss``, clip, take an optimiser step, update the EMA and count the step.

        Parameters
        ----------
        accelerator
            The run's ``accelerate.Accelerator`` (backward pass and gradient clipping across processes).
        loss
            The loss of this step (from the objective).
        grad_clip
            Maximum global gradient norm, or None.

        Returns
        -------
        float or None
            The gradient norm before clipping (None without clipping).
        """
        accelerator.backward(loss)
        grad_norm = None
        if grad_clip is not None:
            grad_norm = float(accelerator.clip_grad_norm_(self.wrapped.parameters(), grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        return grad_norm
