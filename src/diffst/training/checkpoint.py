"""Checkpoints: atomic on disk, loadable without unpickling arbitrary objects.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<step>/`` holding

* ``model.safetensors`` - the live weights (and buffers, e.g. the co-expression matrix);
* ``ema.safetensors`` - the exponential moving average of the weights (used for inference);
* ``optimizer.pt`` - the optimiser state, loadable with ``torch.load(weights_only=True)``;
* ``rng.pt`` - torch / CUDA / numpy / python random states (weights-only loadable);
* ``extras.safetensors`` - ``coexpression`` (N, N), the matrix computed from the training split;
* ``state.json`` - step, epoch, batch offset, data-order description, entropy thresholds and the
  resolved run configuration (also as ``config.yaml``).

The folder is written under a temporary name and renamed when complete, so a process killed at any
moment leaves either a complete checkpoint or none (temporary folders are ignored and cleaned up).
Old checkpoints are renamed away before deletion for the same reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from diffst.config import RunConfig, parse_config
from diffst.errors import InputError

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
]

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)$")


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
    """Complete checkpoints of a run, as ``(step, folder)`` sorted by step."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recent complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


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
    final = root / f"step_{step:08d}"
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
    if (path / "state.json").is_file() and (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise InputError(
            f"{path} is neither a checkpoint folder (with state.json and model.safetensors) nor a run folder "
            f"with complete checkpoints under {CHECKPOINT_DIR}/"
        )
    return latest


def read_training_state(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything in a checkpoint, loaded without unpickling arbitrary objects.

    Returns
    -------
    dict
        ``model`` and ``ema`` (state dicts), ``optimizer`` (state dict), ``rng``, ``coexpression``
        (np.ndarray), ``state`` (the JSON contents without ``config``) and ``config`` (RunConfig).
    """
    folder = find_checkpoint(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        config = parse_config(state.pop("config"), str(folder / "state.json"))
        out = {
            "model": load_file(folder / "model.safetensors", device=str(device)),
            "ema": load_file(folder / "ema.safetensors", device=str(device)),
            "coexpression": load_file(folder / "extras.safetensors")["coexpression"].numpy(),
            "optimizer": torch.load(folder / "optimizer.pt", map_location=device, weights_only=True),
            "rng": torch.load(folder / "rng.pt", map_location="cpu", weights_only=True),
        }
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"checkpoint {folder} is unreadable or incomplete: {exc}") from exc
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
    state = json.loads((folder / "state.json").read_text())
    cfg = parse_config(state.pop("config"), str(folder / "state.json"))
    model = build_model(cfg.model_config_resolved())
    weights = load_file(folder / ("ema.safetensors" if ema else "model.safetensors"), device="cpu")
    model.load_state_dict(weights)
    model.to(device).eval()
    coexpression = load_file(folder / "extras.safetensors")["coexpression"].numpy()
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
