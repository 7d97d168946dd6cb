"""Checkpoints: atomic on disk, loadable without unpickling arbitrary objects.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<step>/`` holding

* ``model.safetensors`` - the live weights (and buffers, e.g. the co-expression matrix);
* ``ema.safetensors`` - the exponential moving average of the weights (used for inference);
* ``optimizer.pt`` - the optimiser state, loadable with ``torch.load(weights_only=True)``;
* ``rng.pt`` - torch / CUDA / numpy / python random states (weights-only loadable);
* ``extras.safetensors`` - ``coexpression`` (N, N), the matrix computed from the training split;
* ``state.json`` - step, epoch, batch offset, data-order description, entropy thresholds and the
  resolved run configuration (also as ``config.yaml``);
* ``manifest.json`` - size and sha256 of every other file, written last.

The folder is written under a temporary name and renamed when complete, so a process killed at any
moment leaves either a complete checkpoint or none (temporary folders are ignored and cleaned up).
Old checkpoints are renamed away before deletion for the same reason. Damage after the fact (a truncated
copy, a bad disk, an edited file) is caught against the manifest when a checkpoint is loaded; checkpoints
written before manifests existed are checked for missing or empty files only.

A run folder is locked by the process that trains into it (:func:`run_lock`), so two runs never write
into one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffst.config import RunConfig, parse_config
from diffst.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: fall back to an exclusive lock file holding the owner's pid
    fcntl = None

__all__ = [
    "CHECKPOINT_DIR",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "find_checkpoint",
    "read_training_state",
    "capture_rng",
    "restore_rng",
    "load_checkpoint",
    "verify_checkpoint",
    "set_aside",
    "checkpoint_folder",
    "run_lock",
]

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("state.json", "model.safetensors", "ema.safetensors", "extras.safetensors", "optimizer.pt",
                    "rng.pt")
LOCK_FILE = ".lock"
_NAME = re.compile(r"^step_(\d+)$")
# What a damaged file makes the loaders raise (torch.load: RuntimeError / UnpicklingError / EOFError).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, EOFError,
                pickle.UnpicklingError, SafetensorError)


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


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Checkpoints of a run, as ``(step, folder)`` sorted by step.

    Every ``step_<N>`` folder was complete when it was renamed into place; whether it is still intact is
    for :func:`verify_checkpoint` to say (the loaders call it).
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recent checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``<run_dir>/checkpoints/step_<step, 8 digits>``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def set_aside(folder: str | Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.corrupt[N]`` (kept for inspection, no longer listed)."""
    folder = Path(folder)
    target, n = folder.with_name(folder.name + ".corrupt"), 0
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.corrupt{n}")
    os.replace(folder, target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damaged(folder: Path, name: str, problem: str) -> InputError:
    return InputError(
        f"checkpoint {folder} is damaged: {name} {problem}. Use an older checkpoint of the run "
        f"({folder.parent}/step_N) or train again."
    )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None  # written before manifests existed
    try:
        files = json.loads(path.read_text())["files"]
        if all(isinstance(v["size"], int) and isinstance(v["sha256"], str) for v in files.values()):
            return files
    except _LOAD_ERRORS:
        pass
    raise _damaged(folder, MANIFEST, "is not a valid checkpoint manifest")


def verify_checkpoint(folder: str | Path, names: tuple[str, ...] = CHECKPOINT_FILES) -> None:
    """Check that the files ``names`` of a checkpoint are present and match its manifest.

    With a ``manifest.json`` each file must have the recorded size and sha256; checkpoints written before
    manifests existed are only checked for missing or empty files.

    Raises
    ------
    InputError
        Naming the checkpoint folder and the first broken file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"checkpoint {folder} does not exist; give a checkpoint folder or a run folder")
    manifest = _read_manifest(folder)
    for name in names:
        path = folder / name
        if not path.is_file():
            raise _damaged(folder, name, "is missing")
        size = path.stat().st_size
        if manifest is None:
            if size == 0:
                raise _damaged(folder, name, "is empty")
        elif name not in manifest:
            raise _damaged(folder, name, f"is not listed in {MANIFEST}")
        elif size != manifest[name]["size"]:
            raise _damaged(folder, name, f"has {size} bytes, {MANIFEST} says {manifest[name]['size']} (truncated "
                                          "or overwritten)")
        elif _sha256(path) != manifest[name]["sha256"]:
            raise _damaged(folder, name, f"does not match its sha256 in {MANIFEST} (changed after saving)")


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"format": "diffst-checkpoint-manifest-1", "files": files}, indent=2))


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
    model: nn.Module,
    ema_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng_state: dict[str, Any],
    coexpression: np.ndarray,
    state: dict[str, Any],
    config: RunConfig,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically and delete all but the ``keep_last`` most recent ones.

    Returns
    -------
    Path
        The checkpoint folder ``<run_dir>/checkpoints/step_<step>``.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_folder(run_dir, step)
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"format": "diffst-checkpoint-1", "step": str(step)}
    save_file(_tensors_for_safetensors(model.state_dict()), tmp / "model.safetensors", metadata=meta)
    save_file(_tensors_for_safetensors(ema_state), tmp / "ema.safetensors", metadata=meta)
    save_file({"coexpression": torch.as_tensor(np.asarray(coexpression, dtype=np.float64))},
              tmp / "extras.safetensors", metadata=meta)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state, tmp / "rng.pt")
    cfg_dict = config.to_dict()
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "config": cfg_dict}, indent=2))
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    _write_manifest(tmp)
    for child in tmp.iterdir():
        _fsync_file(child)
    _fsync_dir(tmp)
    if final.exists():
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        trash = root / f".trash-{old.name}-{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder (its latest checkpoint) or a file in one."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if _NAME.match(path.name) or (path / "state.json").is_file() or (path / MANIFEST).is_file():
        return path  # a checkpoint folder; verify_checkpoint names whatever is wrong with it
    latest = latest_checkpoint(path)
    if latest is None:
        raise InputError(
            f"{path} is neither a checkpoint folder (with state.json and model.safetensors) nor a run folder "
            f"with checkpoints under {CHECKPOINT_DIR}/"
        )
    return latest


def _first_sentence(exc: Exception) -> str:
    # Only the first: torch goes on to advise weights_only=False, which is no cure for a damaged file.
    text = (str(exc).strip().splitlines() or [""])[0]
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")


def _load(folder: Path, name: str, loader: Callable[[Path], Any]) -> Any:
    """``loader(folder / name)``, with any sign of a damaged file turned into an InputError naming it."""
    try:
        return loader(folder / name)
    except InputError:
        raise
    except _LOAD_ERRORS as exc:
        raise _damaged(folder, name, f"cannot be read ({type(exc).__name__}: {_first_sentence(exc)})") from exc


def _read_state(path: Path) -> tuple[dict[str, Any], RunConfig]:
    state = json.loads(path.read_text())
    config = parse_config(state.pop("config"), str(path))
    state["step"] = int(state["step"])
    return state, config


def read_training_state(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything in a checkpoint, verified (:func:`verify_checkpoint`) and loaded without unpickling
    arbitrary objects.

    Returns
    -------
    dict
        ``model`` and ``ema`` (state dicts), ``optimizer`` (state dict), ``rng``, ``coexpression``
        (np.ndarray), ``state`` (the JSON contents without ``config``), ``config`` (RunConfig) and ``path``.

    Raises
    ------
    InputError
        If the checkpoint is missing, damaged or unreadable (the message names the folder and the file).
    """
    folder = find_checkpoint(folder)
    verify_checkpoint(folder)
    state, config = _load(folder, "state.json", _read_state)
    out = {
        "model": _load(folder, "model.safetensors", lambda p: load_file(p, device=str(device))),
        "ema": _load(folder, "ema.safetensors", lambda p: load_file(p, device=str(device))),
        "coexpression": _load(folder, "extras.safetensors", lambda p: load_file(p)["coexpression"].numpy()),
        "optimizer": _load(folder, "optimizer.pt", lambda p: torch.load(p, map_location=device, weights_only=True)),
        "rng": _load(folder, "rng.pt", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    }
    out["state"] = state
    out["config"] = config
    out["path"] = folder
    return out


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """Load a trained denoiser for inference.

    Parameters
    ----------
    path
        A checkpoint folder, or a run folder (its latest checkpoint is used).
    device
        Where to put the model.
    ema
        Load the EMA weights (default; what the paper samples with) instead of the live weights.

    Raises
    ------
    InputError
        If the checkpoint is missing, damaged or unreadable (the message names the folder and the file).

    Returns
    -------
    model
        The denoiser in eval mode, with its co-expression matrix set.
    cfg
        The resolved :class:`~diffst.config.RunConfig` of the run.
    extras
        ``step``, ``entropy_threshold`` (the final curriculum gamma to use at inference, or None for all
        patches), ``coexpression`` (np.ndarray), ``weights`` (``"ema"`` or ``"model"``), ``path`` and the
        rest of ``state.json`` under ``state``.
    """
    from diffst.models.config import build_model

    folder = find_checkpoint(path)
    weights = "ema.safetensors" if ema else "model.safetensors"
    verify_checkpoint(folder, ("state.json", weights, "extras.safetensors"))
    state, cfg = _load(folder, "state.json", _read_state)
    model = build_model(cfg.model_config_resolved())
    _load(folder, weights, lambda p: model.load_state_dict(load_file(p, device="cpu")))
    model.to(device).eval()
    coexpression = _load(folder, "extras.safetensors", lambda p: load_file(p)["coexpression"].numpy())
    extras = {
        "step": state["step"],
        "entropy_threshold": state.get("entropy_threshold_final"),
        "dataset": state.get("dataset"),
        "coexpression": coexpression,
        "weights": "ema" if ema else "model",
        "path": folder,
        "state": state,
    }
    return model, cfg, extras
