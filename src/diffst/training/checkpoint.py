"""Writing checkpoints: atomic on disk, loadable without unpickling arbitrary objects; the run lock.

What a checkpoint holds, and how it is read back and verified, is the run layer's (:mod:`diffst.runs`).
This module writes it: the folder is written under a temporary name, sealed with a manifest (size and
sha256 of every file) and renamed when complete, so a process killed at any moment leaves either a
complete checkpoint or none (temporary folders are ignored and cleaned up). Old checkpoints are renamed
away before deletion for the same reason.

A run folder is locked by the process that trains into it (:func:`run_lock`), so two runs never write
into one folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from diffst.config import RunConfig
from diffst.errors import InputError
from diffst.runs import (
    CHECKPOINT_DIR,
    CONFIG,
    STATE,
    WEIGHTS,
    checkpoint_folder,
    list_checkpoints,
    read_training_state,
    write_manifest,
)

try:
    import fcntl
except ImportError:  # Windows: fall back to an exclusive lock file holding the owner's pid
    fcntl = None

__all__ = ["Checkpointer", "save_checkpoint", "capture_rng", "restore_rng", "set_aside", "clean_temporary",
           "run_lock", "LOCK_FILE"]

log = logging.getLogger("diffst.training")

LOCK_FILE = ".lock"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensors_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give every entry its own CPU copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def capture_rng() -> dict[str, Any]:
    """Random states of torch (CPU and CUDA), numpy's global generator and python's ``random``.

    Everything is a tensor, int, float, str, tuple or list, so ``torch.load(weights_only=True)`` reads it.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def set_aside(folder: str | Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.corrupt[N]`` (kept for inspection, no longer listed)."""
    folder = Path(folder)
    target, n = folder.with_name(folder.name + ".corrupt"), 0
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.corrupt{n}")
    os.replace(folder, target)
    return target


def _pid_alive(pid: int) -> bool:
    import psutil  # comes with accelerate; os.kill(pid, 0) would terminate the process on Windows

    return psutil.pid_exists(pid)


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _in_use(run_dir: Path, pid: int | None) -> InputError:
    who = f"process {pid}" if pid is not None else "another process"
    return InputError(
        f"run folder {run_dir} is in use by {who} (another diffst train); wait for it or choose another run_dir"
    )


def _lock_file(path: Path) -> int:
    """Create ``path`` exclusively (no fcntl); a lock file whose process is gone is taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid = _lock_owner(path)
            if pid is not None and _pid_alive(pid):
                raise _in_use(path.parent, pid) from None
            path.unlink(missing_ok=True)
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise _in_use(path.parent, _lock_owner(path))


def _flock(path: Path) -> int | None:
    """Lock ``path`` with flock and write our pid into it; None where flock is unavailable."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(path.parent, _lock_owner(path)) from None
    except OSError:  # a filesystem without flock
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on a run folder for the duration of the ``with`` block.

    The lock is ``fcntl.flock`` on ``<run_dir>/.lock`` (which holds the owner's pid), so the operating
    system releases it when the process ends, even by SIGKILL. Without fcntl (Windows), or on a filesystem
    without flock, ``.lock`` is created exclusively and removed on exit; one left by a dead process is
    taken over.

    Raises
    ------
    InputError
        If another process holds the lock (the message names its pid).
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = _flock(path)
        flocked = fd is not None
        if not flocked:
            fd = _lock_file(path)
    except OSError as exc:
        raise InputError(f"cannot lock run folder {run_dir} ({exc}); choose a run_dir you can write to") from None
    try:
        yield path
    finally:
        if not flocked:
            path.unlink(missing_ok=True)
        os.close(fd)  # releases the flock; the file stays (removing it would race with the next locker)


def clean_temporary(run_dir: str | Path) -> None:
    """Remove leftovers of checkpoints that were being written or deleted when a process died."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng_state: dict[str, Any],
    state: dict[str, Any],
    config: RunConfig,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically and delete all but the ``keep_last`` most recent ones.

    Parameters
    ----------
    run_dir, step
        The run folder and the training step.
    model_state, ema_state
        State dicts of the live model and of its EMA (written as ``model.safetensors`` / ``ema.safetensors``).
    optimizer_state, rng_state
        Written as ``optimizer.pt`` / ``rng.pt`` (weights-only loadable).
    state
        Written as ``state.json`` (with ``step`` added).
    config
        The resolved configuration, written as ``config.yaml``.
    keep_last
        Number of checkpoints kept.

    Returns
    -------
    Path
        The checkpoint folder ``<run_dir>/checkpoints/step_<step>``, sealed by ``manifest.json``.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_folder(run_dir, step)
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"format": "diffst-checkpoint-1", "step": str(step)}
    save_file(_tensors_for_safetensors(model_state), tmp / WEIGHTS["model"], metadata=meta)
    save_file(_tensors_for_safetensors(ema_state), tmp / WEIGHTS["ema"], metadata=meta)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state, tmp / "rng.pt")
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2))
    (tmp / CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    write_manifest(tmp)
    for child in tmp.iterdir():
        _fsync_file(child)
    _fsync_dir(tmp)
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        _discard(old)
    return final


def _discard(folder: Path) -> None:
    trash = folder.parent / f".trash-{folder.name}-{os.getpid()}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


class Checkpointer:
    """Finds, writes and prunes the checkpoints of one run folder.

    Parameters
    ----------
    run_dir
        The run folder.
    keep_last
        Number of most recent checkpoints kept.
    main
        Whether this is the main process (the only one that writes or renames anything).
    """

    def __init__(self, run_dir: Path, keep_last: int, main: bool):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.main = main

    def start(self, resume: bool) -> dict[str, Any] | None:
        """Return the checkpoint to continue from (see :meth:`resume`), or None for a new run.

        Call :func:`clean_temporary` first (main process) when resuming.

        Parameters
        ----------
        resume
            Continue the run (see :meth:`resume`).

        Returns
        -------
        dict or None
            As :func:`diffst.runs.read_training_state` returns it.

        Raises
        ------
        InputError
            Without ``resume``, when the run folder already holds checkpoints.
        """
        if resume:
            return self.resume()
        if list_checkpoints(self.run_dir):
            raise InputError(f"{self.run_dir} already holds checkpoints; resume it (--resume) or choose a new run_dir")
        return None

    def resume(self) -> dict[str, Any] | None:
        """Read the newest intact checkpoint (:func:`diffst.runs.read_training_state`); None if there is none.

        Newer damaged ones are skipped with a warning and (main process) renamed to ``step_N.corrupt``.

        Returns
        -------
        dict or None
            As :func:`diffst.runs.read_training_state` returns it.

        Raises
        ------
        InputError
            When checkpoints exist but none is intact.
        """
        found = list_checkpoints(self.run_dir)
        damaged = []
        for _, folder in reversed(found):
            try:
                checkpoint = read_training_state(folder)
            except InputError as exc:
                log.warning("skipping damaged checkpoint %s: %s", folder, exc)
                damaged.append(folder)
                continue
            if self.main:
                for folder in damaged:
                    log.warning("renamed damaged checkpoint %s to %s", folder, set_aside(folder).name)
            return checkpoint
        if found:
            raise InputError(f"cannot resume: no checkpoint in {self.run_dir / CHECKPOINT_DIR} is intact ({len(found)} "
                             "damaged: see the warnings above or train.log); train into a new run_dir")
        log.warning("resume requested but %s has no checkpoint; starting from step 0", self.run_dir)
        return None

    def save(self, step: int, *, model: torch.nn.Module, ema_state: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer, state: dict[str, Any], config: RunConfig) -> Path:
        """Write the checkpoint of ``step`` (main process only) with :func:`save_checkpoint`.

        Parameters
        ----------
        step
            Training step.
        model, ema_state, optimizer
            The live (unwrapped) model, the EMA weights and the optimiser.
        state
            Contents of ``state.json`` (data position, thresholds, dataset spec).
        config
            The resolved configuration (``config.yaml``).

        Returns
        -------
        Path
            The checkpoint folder.
        """
        return save_checkpoint(self.run_dir, step, model_state=model.state_dict(), ema_state=ema_state,
                               optimizer_state=optimizer.state_dict(), rng_state=capture_rng(), state=state,
                               config=config, keep_last=self.keep_last)
