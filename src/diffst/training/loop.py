"""The training loop: data-parallel through HuggingFace Accelerate, resumable bit-for-bit on CPU.

Launch on one process with ``python -m diffst.training --config FILE`` (or ``diffst train``), on several
with ``torchrun --standalone --nproc_per_node K -m diffst.training --config FILE`` or
``accelerate launch --multi_gpu --num_processes K -m diffst.training --config FILE``. On a machine
without CUDA (or with ``device: cpu``) both run K CPU processes over gloo. Note that
``accelerate launch --cpu`` always starts a single process whatever ``--num_processes`` says (Accelerate
routes ``--cpu`` to its simple launcher), so use ``--multi_gpu`` or torchrun for several CPU processes.
Only the main process writes files; every process trains on its own shard of each epoch.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from diffst.config import ConfigError, RunConfig, resolve_config, save_config
from diffst.diffusion.target import encode_target
from diffst.errors import InputError, TrainingInterrupted
from diffst.training.checkpoint import (
    capture_rng,
    checkpoint_folder,
    clean_temporary,
    latest_checkpoint,
    list_checkpoints,
    read_training_state,
    restore_rng,
    run_lock,
    save_checkpoint,
    set_aside,
)
from diffst.training.data import (
    STREAM_NOISE,
    STREAM_TORCH,
    STREAM_VAL,
    EpochOrder,
    SeededTiles,
    derive_seed,
    make_loader,
)
from diffst.training.ema import EMA

__all__ = ["train", "METRIC_COLUMNS", "VAL_COLUMNS", "RESUMABLE_CHANGES"]

log = logging.getLogger("diffst.training")

METRIC_COLUMNS = [
    "step", "epoch", "loss", "diffusion_loss", "eps_mse", "vlb", "disentangle", "grad_norm", "lr", "gamma",
    "seconds",
]
VAL_COLUMNS = ["step", "split", "val_loss", "val_eps_mse", "val_vlb", "val_loss_ema", "val_eps_mse_ema",
               "val_vlb_ema"]
# Settings that may differ between a run and its resumption (they do not change the optimisation path,
# except the length of training, which the user changes on purpose).
RESUMABLE_CHANGES = {
    "train.steps", "train.epochs", "train.log_every", "train.val_every", "train.val_batches",
    "train.checkpoint_every", "train.keep_last", "train.tensorboard", "data.num_workers", "device",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but CUDA is not available; use 'auto' or 'cpu'")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)]
    return Accelerator(
        cpu=cfg.device == "cpu", mixed_precision=cfg.train.mixed_precision, kwargs_handlers=handlers
    )


def _example_target(cfg: RunConfig, run_dir: Path) -> Path | None:
    """The folder to prepare the built-in example into: ``data.path`` when it is absent or an empty folder.

    None when ``data.path`` already holds a dataset (or no example is configured). Anything else there may
    be the user's, so it is an error rather than replaced.
    """
    path = Path(cfg.data.path).resolve()
    if cfg.data.example is None or (path / "dataset.json").is_file():
        return None
    if run_dir == path or path in run_dir.parents:
        raise InputError(f"run_dir {run_dir} lies inside data.path {path}, where the built-in example is to be "
                         "prepared; choose a run_dir outside data.path")
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        kind = "a file" if not path.is_dir() else "a folder that is not empty"
        raise InputError(
            f"data.path {path} is {kind} and holds no prepared dataset (no dataset.json), so the built-in "
            "example is not prepared there (that would replace what it holds); set data.path to a new or "
            "empty folder, or to a dataset made by `diffst prepare`"
        )
    return path


def _prepare_example(cfg: RunConfig, path: Path) -> None:
    from diffst.data.geometry import tile_preset
    from diffst.data.prepare import SplitSpec, prepare_dataset
    from diffst.example import EXAMPLE_TEST_REGION, load_example

    ex = cfg.data.example
    log.info("preparing the built-in example into %s", path)
    prepare_dataset(
        [load_example()],
        path,
        tile_preset(ex.preset, ex.scale),
        n_genes=ex.n_genes,
        split=SplitSpec(test_region=EXAMPLE_TEST_REGION, train_stride_um=ex.train_stride_um),
        progress=False,
    )


def _make_run_dir(run_dir: Path) -> None:
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"cannot create run_dir {run_dir}: {blocker} is a file, not a folder; choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create run_dir {run_dir} ({exc.strerror}); choose a folder you can write to") from None


class _StopRequest:
    """Inside ``with``: SIGINT / SIGTERM ask training to stop after the current step; a second one aborts.

    Handlers are installed only in the main thread (Python allows no other); the previous ones are
    restored on exit.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # checkpoints are atomic, so aborting mid-save breaks nothing
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _interrupted(run_dir: Path, step: int, signal_name: str | None) -> TrainingInterrupted:
    log.warning("%s: stopped after step %d", signal_name or "signal on another process", step)
    return TrainingInterrupted(
        f"interrupted at step {step}; checkpoint saved to {checkpoint_folder(run_dir, step)}; "
        f"resume with: diffst train --config {run_dir / 'config.yaml'} --resume"
    )


def _resume_from(run_dir: Path, main: bool) -> dict[str, Any] | None:
    """The newest intact checkpoint of ``run_dir``; newer damaged ones are skipped with a warning and
    (main process) renamed to ``step_N.corrupt``."""
    found = list_checkpoints(run_dir)
    damaged = []
    for _, folder in reversed(found):
        try:
            checkpoint = read_training_state(folder)
        except InputError as exc:
            log.warning("skipping damaged checkpoint %s: %s", folder, exc)
            damaged.append(folder)
            continue
        if main:
            for folder in damaged:
                log.warning("renamed damaged checkpoint %s to %s", folder, set_aside(folder).name)
        return checkpoint
    if found:
        raise InputError(f"cannot resume: no checkpoint in {run_dir / 'checkpoints'} is intact ({len(found)} "
                         "damaged: see the warnings above or train.log); train into a new run_dir")
    log.warning("resume requested but %s has no checkpoint; starting from step 0", run_dir)
    return None


def _open_datasets(cfg: RunConfig):
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
    return train_ds, val_ds, note


def _model_kwargs(batch: dict[str, torch.Tensor], gamma: float | None) -> dict[str, Any]:
    return {
        "lr": batch["lr"],
        "tissue": batch["tissue"],
        "cells": batch["cells"],
        "cell_entropy": batch["cell_entropy"],
        "entropy_threshold": gamma,
    }


def _gamma(cfg: RunConfig, progress: float, entropies: np.ndarray) -> float | None:
    if not cfg.train.curriculum:
        return None
    from diffst.models.histology import curriculum_threshold

    g = curriculum_threshold(
        progress, entropies, cfg.train.curriculum_milestones, cfg.train.curriculum_quantiles
    )
    return None if not math.isfinite(g) else float(g)


def _losses(diffusion, model, batch, gamma, generator, device, disentangle_weight):
    hr = batch["hr"]
    t = diffusion.sample_timesteps(hr.shape[0], generator=generator)
    noise = torch.randn(hr.shape, generator=generator, dtype=hr.dtype)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    x0 = encode_target(batch["hr"], batch["lr"], diffusion.cfg.target)
    terms = diffusion.training_losses(
        model, x0, t.to(device), noise=noise.to(device), model_kwargs=_model_kwargs(batch, gamma)
    )
    total = terms["loss"]
    if "disentangle" in terms:
        total = total + disentangle_weight * terms["disentangle"]
    return total, terms


@torch.no_grad()
def _validate(cfg, diffusion, models: dict[str, torch.nn.Module], val_ds, gamma, device) -> dict[str, float]:
    """Mean losses over the validation split with fixed timesteps and noise (same for every call)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(val_ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0)
    out: dict[str, float] = {}
    for tag, model in models.items():
        was_training = model.training
        model.eval()
        sums = {"loss": 0.0, "eps_mse": 0.0, "vlb": 0.0}
        count = 0
        for i, batch in enumerate(loader):
            if cfg.train.val_batches is not None and i >= cfg.train.val_batches:
                break
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, STREAM_VAL, i))
            _, terms = _losses(diffusion, model, batch, gamma, gen, device, 0.0)
            n = batch["hr"].shape[0]
            for k in sums:
                if k in terms:
                    sums[k] += float(terms[k]) * n
            count += n
        model.train(was_training)
        for k, v in sums.items():
            out[f"val_{k}{tag}"] = v / max(count, 1)
    return out


class _CsvLog:
    """Append-only CSV (main process only); on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, columns: list[str], keep_until: int | None):
        self.path = path
        self.columns = columns
        if keep_until is not None and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(float(r["step"])) <= keep_until]
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, columns)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)
        elif keep_until is None or not path.exists():
            with open(path, "w", newline="") as fh:
                csv.DictWriter(fh, columns).writeheader()
        self.fh = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.fh, columns)

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.columns})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _close(*handles: Any) -> None:
    for handle in handles:
        if handle is not None:
            handle.close()


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed; metrics go to metrics.csv only (pip install diffst[tensorboard])")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _check_resume_config(saved: RunConfig, new: RunConfig) -> None:
    a, b = _flatten(saved.to_dict()), _flatten(new.to_dict())
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume: the configuration differs from the checkpoint's in {details}. "
            f"Only {sorted(RESUMABLE_CHANGES)} may change on resume; use another run_dir for a new run."
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _param_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() + p.detach().double().sum() for p in model.parameters()))


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Train a denoiser as described by ``cfg``; returns the run folder.

    Parameters
    ----------
    cfg
        The run configuration (:func:`diffst.config.load_config`). Its resolved form is saved as
        ``<run_dir>/config.yaml`` and inside every checkpoint.
    resume
        Continue from the newest intact checkpoint in ``cfg.run_dir`` (same step, weights, EMA,
        optimiser, data order and random streams, so the result equals an uninterrupted run); newer
        damaged ones are skipped with a warning and renamed ``step_N.corrupt``. Without a checkpoint,
        training starts from scratch. Without ``resume``, a ``run_dir`` that already holds checkpoints
        is an error.

    Returns
    -------
    Path
        ``run_dir``, holding ``config.yaml``, ``run_info.json``, ``metrics.csv`` (one row per step:
        step, epoch, loss, diffusion_loss, eps_mse, vlb, disentangle, grad_norm, lr, gamma, seconds),
        ``val.csv`` (when a validation split exists), ``train.log``, ``checkpoints/step_<step>/`` and
        ``tensorboard/`` (when tensorboard is installed).

    Raises
    ------
    InputError
        On bad inputs, e.g. a ``run_dir`` in use by another training process (the run folder is locked
        for the whole run), or a non-empty ``data.path`` without a dataset when ``data.example`` is set.
    TrainingInterrupted
        After SIGINT / SIGTERM: the current step is finished and a checkpoint written first; the message
        gives the command that resumes.
    """
    from diffst.diffusion.process import GaussianDiffusion
    from diffst.models.config import build_model
    from diffst.models.graph import coexpression_matrix

    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    run_dir = Path(cfg.run_dir).resolve()

    example = None
    if main:
        example = _example_target(cfg, run_dir)
        _make_run_dir(run_dir)
    # Only the main process writes, so it alone holds the run folder's lock, for the whole run.
    with run_lock(run_dir) if main else contextlib.nullcontext():
        handler = None
        if main:
            handler = logging.FileHandler(run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        try:
            if example is not None:
                _prepare_example(cfg, example)
            accelerator.wait_for_everyone()
            return _train(cfg, resume, accelerator, run_dir, main, rank, world, device,
                          GaussianDiffusion, build_model, coexpression_matrix)
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()


def _train(cfg, resume, accelerator, run_dir, main, rank, world, device,
           GaussianDiffusion, build_model, coexpression_matrix) -> Path:
    train_ds, val_ds, val_note = _open_datasets(cfg)
    rcfg = resolve_config(cfg, len(train_ds.genes), train_ds.image_channels)
    model_cfg = rcfg.model_config_resolved()

    checkpoint = None
    if resume:
        if main:
            clean_temporary(run_dir)
        accelerator.wait_for_everyone()
        checkpoint = _resume_from(run_dir, main)
        if checkpoint is not None:
            _check_resume_config(checkpoint["config"], rcfg)
    elif list_checkpoints(run_dir):
        raise InputError(
            f"{run_dir} already holds checkpoints; resume it (--resume) or choose a new run_dir"
        )

    tiles = list(range(len(train_ds))) if cfg.data.subset is None else list(cfg.data.subset)
    if max(tiles) >= len(train_ds):
        raise ConfigError(f"data.subset has tile {max(tiles)} but the training split has {len(train_ds)} tiles")
    tiles_sorted = sorted(set(tiles))
    coexpression = coexpression_matrix(np.asarray(train_ds.hr_counts[tiles_sorted]))
    entropies = np.asarray(train_ds.cell_entropy[tiles_sorted], dtype=np.float64)

    order = EpochOrder(tiles, cfg.data.batch_size, world, rank, cfg.seed)
    spe = order.steps_per_epoch
    total = cfg.train.steps if cfg.train.steps is not None else cfg.train.epochs * spe
    gamma_final = _gamma(rcfg, 1.0, entropies)

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    if hasattr(model, "set_coexpression"):
        model.set_coexpression(coexpression)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps,
        weight_decay=cfg.train.weight_decay,
    )
    ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        ema.load_state_dict(checkpoint["ema"], checkpoint["state"]["ema_updates"])
        step = int(checkpoint["state"]["step"])
        if main:
            restore_rng(checkpoint["rng"])
        if checkpoint["state"].get("world_size") != world:
            log.warning("resuming with %d processes instead of %s: the data order changes", world,
                        checkpoint["state"].get("world_size"))
    ema.model.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    diffusion = GaussianDiffusion(rcfg.diffusion)
    view = SeededTiles(train_ds, cfg.seed)

    info = {
        "world_size": world,
        "device": str(device),
        "distributed_type": str(accelerator.distributed_type),
        "n_train_tiles": len(tiles),
        "steps_per_epoch": spe,
        "total_steps": total,
        "effective_batch_size": cfg.data.batch_size * world,
        "validation": val_note,
        "started_at_step": step,
        "n_parameters": sum(p.numel() for p in raw_model.parameters()),
        "entropy_threshold_final": gamma_final,
    }
    metrics = val_log = writer = None
    if main:
        save_config(rcfg, run_dir / "config.yaml")
        _write_json(run_dir / "run_info.json", info)
        log.info("run %s: %s", run_dir, json.dumps(info))
        keep = step if checkpoint is not None else None
        metrics = _CsvLog(run_dir / "metrics.csv", METRIC_COLUMNS, keep)
        if val_ds is not None:
            val_log = _CsvLog(run_dir / "val.csv", VAL_COLUMNS, keep)
        writer = _tensorboard(run_dir, rcfg.train.tensorboard)

    def checkpoint_now(current_gamma):
        if main:
            epoch, offset = divmod(step, spe)
            state = {
                "epoch": epoch, "batch_in_epoch": offset, "steps_per_epoch": spe, "total_steps": total,
                "world_size": world, "seed": cfg.seed, "ema_updates": ema.num_updates,
                "entropy_threshold": current_gamma, "entropy_threshold_final": gamma_final,
                "data_order": "tiles of epoch e: permutation from (seed, e), dealt round-robin to ranks; "
                              "augmentation from (seed, e, tile); noise/timesteps from (seed, rank, step)",
                "weights_for_inference": "ema.safetensors",
                # What inference needs to put new data into this model's space and back to counts.
                "dataset": {"genes": list(train_ds.genes), "normaliser": train_ds.normaliser.model_dump(),
                            "geometry": train_ds.geometry.to_dict(), "image_channels": train_ds.image_channels},
            }
            path = save_checkpoint(
                run_dir, step, model=raw_model, ema_state=ema.state_dict(),
                optimizer_state=optimizer.state_dict(), rng_state=capture_rng(), coexpression=coexpression,
                state=state, config=rcfg, keep_last=rcfg.train.keep_last,
            )
            log.info("checkpoint %s", path)
        accelerator.wait_for_everyone()

    def validate_now(current_step):
        if val_ds is not None and main:
            vals = _validate(rcfg, diffusion, {"": raw_model, "_ema": ema.model}, val_ds, gamma_final, device)
            val_log.write({"step": current_step, "split": cfg.data.val_split, **vals})
            if writer is not None:
                for k, v in vals.items():
                    writer.add_scalar(f"val/{k}", v, current_step)
            log.info("step %d validation %s", current_step, vals)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total, initial=step, disable=not main, dynamic_ncols=True, desc="train")
    model.train()
    gamma = _gamma(rcfg, step / total, entropies)
    with _StopRequest() as stop:
        while step < total:
            epoch, offset = divmod(step, spe)
            loader = make_loader(view, order.batches(epoch, offset), cfg.data.num_workers)
            for batch in loader:
                started = time.perf_counter()
                gamma = _gamma(rcfg, step / total, entropies)
                torch.manual_seed(derive_seed(cfg.seed, STREAM_TORCH, rank, step))  # dropout etc.
                gen = torch.Generator().manual_seed(derive_seed(cfg.seed, STREAM_NOISE, rank, step))
                loss, terms = _losses(diffusion, model, batch, gamma, gen, device, cfg.train.disentangle_weight)
                accelerator.backward(loss)
                grad_norm = None
                if cfg.train.grad_clip is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(raw_model)
                step += 1

                names = ["loss", "eps_mse", "vlb", "disentangle"]
                values = torch.stack([loss.detach().float()] + [
                    terms[n].detach().float() if n in terms else torch.tensor(float("nan"), device=device)
                    for n in names
                ] + [torch.tensor(float(stop.signal is not None), device=device)])
                values = accelerator.reduce(values, "mean")  # also tells every rank that one was signalled
                stopping = bool(values[5] > 0) and step < total
                row = {
                    "step": step, "epoch": epoch, "loss": float(values[0]), "diffusion_loss": float(values[1]),
                    "eps_mse": float(values[2]), "vlb": float(values[3]), "disentangle": float(values[4]),
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "lr": optimizer.param_groups[0]["lr"], "gamma": gamma,
                    "seconds": round(time.perf_counter() - started, 4),
                }
                for k in ("vlb", "disentangle"):
                    if math.isnan(row[k]):
                        row[k] = None
                if main:
                    metrics.write(row)
                    bar.update(1)
                    if step % cfg.train.log_every == 0 or step == total:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", eps=f"{row['eps_mse']:.4f}")
                        if writer is not None:
                            for k, v in row.items():
                                if k not in ("step", "epoch") and v is not None:
                                    writer.add_scalar(f"train/{k}", v, step)
                if cfg.train.val_every and step % cfg.train.val_every == 0 and step < total:
                    validate_now(step)
                if step % cfg.train.checkpoint_every == 0 or step == total or stopping:
                    checkpoint_now(gamma)
                if stopping:
                    bar.close()
                    _close(metrics, val_log, writer)
                    raise _interrupted(run_dir, step, stop.signal)
                if step >= total:
                    break
    bar.close()
    if cfg.train.val_every:
        validate_now(step)

    sums = accelerator.gather(torch.tensor([_param_checksum(raw_model)], dtype=torch.float64, device=device))
    if main:
        info.update(
            finished=True, final_step=step,
            rank_weight_checksums=[float(x) for x in sums.cpu()],
            final_checkpoint=str(latest_checkpoint(run_dir)),
        )
        _write_json(run_dir / "run_info.json", info)
        _close(metrics, val_log, writer)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(rcfg.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
