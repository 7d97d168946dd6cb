"""Run artifacts: the files a training run leaves behind and how to read them back.

This layer sits below both training (which writes runs) and inference (which reads them); neither
imports the other. A run folder holds ``config.yaml`` (the resolved configuration), ``run_info.json``,
``metrics.csv``, ``val.csv``, ``train.log``, ``.lock`` and ``checkpoints/step_<8 digits>/`` with

* ``model.safetensors`` - the live weights and buffers (the co-expression matrix is the model's buffer
  ``coexpression``, so it is stored with the weights and nowhere else);
* ``ema.safetensors`` - the exponential moving average of the weights (used for inference);
* ``optimizer.pt``, ``rng.pt`` - optimiser and random states, loadable with ``weights_only=True``;
* ``config.yaml`` - the resolved run configuration;
* ``state.json`` - step, data position, entropy thresholds and the dataset spec (genes, normaliser,
  geometry, image channels);
* ``manifest.json`` - size and sha256 of every other file, written last.

Every checkpoint is self-contained, so one copied elsewhere still predicts. Damage after the fact is
caught against the manifest on load; checkpoints written before manifests existed are checked for
missing or empty files only.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from diffst.config import RunConfig, parse_config
from diffst.core.geometry import TileGeometry
from diffst.data.normalise import LogScaleNormaliser
from diffst.errors import InputError
from diffst.hashing import sha256_file

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILES",
    "DatasetSpec",
    "Run",
    "load_run",
    "load_base_run",
    "base_run_record",
    "base_run_records",
    "load_checkpoint",
    "read_training_state",
    "list_checkpoints",
    "latest_checkpoint",
    "find_checkpoint",
    "checkpoint_folder",
    "verify_checkpoint",
    "write_manifest",
    "RegressionOutput",
    "build_run_model",
    "regression_output",
    "regression_point",
    "spot_ratio_shrink",
]

CHECKPOINT_DIR = "checkpoints"
#: Where a run with ``train.keep_best`` keeps its checkpoint of lowest validation loss (a run folder of its own).
BEST_DIR = "best"
MANIFEST = "manifest.json"
STATE = "state.json"
CONFIG = "config.yaml"
WEIGHTS = {"ema": "ema.safetensors", "model": "model.safetensors"}
CHECKPOINT_FILES = (STATE, CONFIG, WEIGHTS["model"], WEIGHTS["ema"], "optimizer.pt", "rng.pt")
_NAME = re.compile(r"^step_(\d+)$")
# What a damaged file makes the loaders raise (torch.load: RuntimeError / UnpicklingError / EOFError).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, EOFError,
                pickle.UnpicklingError, SafetensorError, yaml.YAMLError)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about the data it was trained on.

    Attributes
    ----------
    genes
        Gene names, in channel order.
    normaliser
        Maps counts to the model space and back (fitted on the training tiles).
    geometry
        Tile geometry (bins, scale, image size) of the training data.
    image_channels
        Channels of the histology image.
    self_supervised
        The run learnt from a spot-only slide's own spots (HR = the spots): applied to real spots, it predicts
        the sub-spot map (:func:`~diffst.core.geometry.sub_spot_geometry`).
    """

    genes: list[str]
    normaliser: LogScaleNormaliser
    geometry: TileGeometry
    image_channels: int
    self_supervised: bool = False

    @classmethod
    def from_tiles(cls, tiles: Any) -> DatasetSpec:
        """Describe the data of a split.

        Parameters
        ----------
        tiles
            A :class:`~diffst.data.dataset.PreparedTiles` split.

        Returns
        -------
        DatasetSpec
        """
        return cls(list(tiles.genes), tiles.normaliser, tiles.geometry, int(tiles.image_channels),
                   bool(getattr(tiles, "self_supervised", False)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        """Read the spec back from :meth:`to_dict`'s form.

        Parameters
        ----------
        data
            ``genes``, ``normaliser``, ``geometry`` and ``image_channels``.

        Returns
        -------
        DatasetSpec
        """
        return cls(list(data["genes"]), LogScaleNormaliser(**data["normaliser"]), TileGeometry(**data["geometry"]),
                   int(data["image_channels"]), bool(data.get("self_supervised", False)))

    def same_maps(self, other: DatasetSpec) -> bool:
        """Tell whether HR maps of this data and of ``other`` mean the same: genes, normaliser, scale, HR tile."""
        return (self.genes == other.genes and self.normaliser == other.normaliser
                and self.geometry.scale == other.geometry.scale and self.geometry.tile_hr == other.geometry.tile_hr)

    def to_dict(self) -> dict[str, Any]:
        """Return the plain JSON-serialisable form.

        Returns
        -------
        dict
            ``genes``, ``normaliser``, ``geometry``, ``image_channels`` and ``self_supervised`` (a checkpoint's
            ``state.json`` holds it under ``dataset``; older checkpoints lack the last, read as False).
        """
        return {"genes": list(self.genes), "normaliser": self.normaliser.model_dump(),
                "geometry": self.geometry.to_dict(), "image_channels": self.image_channels,
                "self_supervised": self.self_supervised}


@dataclass
class Run:
    """A trained run, read back from one checkpoint (see :func:`load_run`).

    Attributes
    ----------
    model
        The denoiser (a :class:`~diffst.models.base.Denoiser`) in eval mode, with EMA or live weights.
    config
        The resolved :class:`~diffst.config.RunConfig` of the run.
    dataset
        The :class:`DatasetSpec` of the training data (None for checkpoints older than the spec).
    coexpression
        The (N, N) co-expression matrix of the training split, or None for a model without a gene graph.
    entropy_threshold
        The final curriculum gamma, to use at inference (None: every cell patch).
    step
        Training step of the checkpoint.
    path
        The checkpoint folder.
    weights
        ``"ema"`` or ``"model"``.
    state
        The rest of ``state.json``.
    base
        The frozen regression run a ``diffusion.target: regression_residual`` run refines (its checkpoint
        is the one ``state.json`` records under ``base_run``); None for every other run.
    members
        A regression run's fellow members of a seed ensemble (:func:`load_base_run` of several runs): the
        same regression trained with other seeds; :meth:`predict_hr` averages all their answers. Empty for
        a single run.
    """

    model: nn.Module
    config: RunConfig
    dataset: DatasetSpec | None
    coexpression: np.ndarray | None
    entropy_threshold: float | None
    step: int
    path: Path
    weights: Literal["ema", "model"] = "ema"
    state: dict[str, Any] = field(default_factory=dict)
    base: Run | None = None
    members: tuple[Run, ...] = ()

    @property
    def models(self) -> tuple[nn.Module, ...]:
        """The networks whose answers a prediction of this run averages: its own, then its members'."""
        return (self.model, *(m.model for m in self.members))

    @torch.no_grad()
    def predict_hr(self, batch: dict[str, Any], device: str | torch.device, views: int = 1) -> torch.Tensor:
        """Return the model-space HR prediction of a regression run for a batch of tiles (no gradients).

        The conditions are built with the run's own final entropy threshold, as at inference, so a
        two-stage run sees the same base prediction in training and in prediction. A seed ensemble
        (:attr:`members`) answers with the mean of its members' answers.

        Parameters
        ----------
        batch
            A dataset batch (``lr``, ``tissue``, ``cells``, ``cell_entropy``; the HR tile size is the run's).
        device
            Where the run's model is.
        views
            Average the answer over this many of the input's square symmetries (:func:`regression_point`).

        Returns
        -------
        Tensor
            (B, N, H, W) model-space HR maps.
        """
        from diffst.models.base import Conditions

        if self.config.train.objective != "regression":
            raise InputError(f"{self.path} is a {self.config.train.objective} run; a base run must be a regression "
                             "run (train.objective: regression)")
        cond = Conditions.from_batch(batch, self.entropy_threshold).to(device)
        n_genes = len(self.dataset.genes) if self.dataset is not None else int(cond.lr.shape[1])
        tile = self.dataset.geometry.tile_hr if self.dataset is not None else int(batch["hr"].shape[-1])
        return regression_point(self.models, cond, (cond.lr.shape[0], n_genes, tile, tile), self.config,
                                self.dataset, views)


def regression_point(model: nn.Module | tuple[nn.Module, ...], cond: Any, shape: tuple[int, int, int, int],
                     config: RunConfig, dataset: DatasetSpec | None, views: int = 1) -> torch.Tensor:
    """Return a regression's answer averaged over ``views`` square symmetries of its input, in model space.

    The model was trained on tiles turned and mirrored at random (``data.augment``); asked the same question
    under each of the 8 symmetries (:data:`~diffst.core.symmetry.SYMMETRIES`, the identity first) it answers
    slightly differently, and the mean of its answers, in counts, has less variance than any one of them
    (test-time augmentation: one network call per view). Several models (a seed ensemble: the same
    regression trained with other seeds) average the same way, over models and views. A spot-ratio answer
    stays spot-consistent.

    A spot-ratio answer is then shrunk toward the allocation of the interpolated LR counts
    (:func:`~diffst.models.spot_ratio.interpolated_shares`) by ``train.spot_ratio_shrink``: in counts,
    ``(1 - shrink) * answer + shrink * interpolated``, still spot-consistent. The views and seeds of a
    network trained on one tissue agree with each other on tissue unlike it, confidently and wrongly (on
    HER2ST some 2 x 2 blocks of spots got ~80 % of their counts in one spot where the spots held a quarter
    each); averaged with an answer that cannot be confident that way, no bin's error exceeds the mean of
    the two answers' errors (``train.spot_ratio_shrink`` has the measurements).

    Parameters
    ----------
    model
        The regression model, or a tuple of models of the same run configuration (an ensemble).
    cond, shape, config, dataset
        As for :func:`regression_output`.
    views
        1 to 8; 1 with one model and no shrink is :func:`regression_output` alone.

    Returns
    -------
    Tensor
        (B, N, H, W) model-space HR maps.
    """
    from diffst.core.symmetry import SYMMETRIES, undo_symmetry

    if not 1 <= views <= len(SYMMETRIES):
        raise InputError(f"views={views}: a tile has {len(SYMMETRIES)} square symmetries; choose 1 to 8")
    models = tuple(model) if isinstance(model, (tuple, list)) else (model,)
    shrink = spot_ratio_shrink(config)
    if views == 1 and len(models) == 1 and not shrink:
        return regression_output(models[0], cond, shape, config, dataset).maps
    # Averaged in counts where the output has them (spot-ratio), else in model space. One call per view:
    # batching the views measured no faster on a CPU at the paper's tile size and held 230 MB more.
    total, in_counts = None, False
    for member in models:
        for turns, flip in SYMMETRIES[:views]:
            out = regression_output(member, cond.symmetry(turns, flip), shape, config, dataset)
            in_counts = out.counts is not None
            answer = undo_symmetry(out.counts if in_counts else out.maps, turns, flip)
            total = answer if total is None else total + answer
    n = views * len(models)
    if not in_counts:
        return total / n
    counts = total / n
    if shrink:
        from diffst.models.spot_ratio import interpolated_shares

        scale = dataset.geometry.scale
        counts = (1.0 - shrink) * counts + shrink * interpolated_shares(
            dataset.normaliser.lr_to_counts(cond.lr, scale), scale)
    return dataset.normaliser.to_model(counts)


def spot_ratio_shrink(config: RunConfig) -> float:
    """Return the share of a run's answer taken from the interpolated allocation (``train.spot_ratio_shrink``).

    Zero for anything but a ``spot_poisson`` regression (whose answer has no allocation to shrink).
    """
    train = config.train
    if train.objective != "regression" or train.regression != "spot_poisson":
        return 0.0
    return float(train.spot_ratio_shrink)


def build_run_model(config: RunConfig) -> nn.Module:
    """Build the model a run trains.

    The registered ``model.arch``, with the image head of :class:`~diffst.models.spot_ratio.SpotRatioModel`
    around it for a ``spot_poisson`` regression.
    """
    from diffst.models.registry import build_model
    from diffst.models.spot_ratio import SpotRatioModel

    model_cfg = config.model_config_resolved()
    model = build_model(model_cfg)
    if config.train.objective == "regression" and config.train.regression == "spot_poisson":
        model = SpotRatioModel(model, model_cfg.n_genes, model_cfg.image_channels,
                               linear_prior=config.train.linear_prior)
    return model


@dataclass
class RegressionOutput:
    """A regression run's prediction for a batch of tiles.

    ``maps``: (B, N, H, W) in model space; ``counts``: the same in counts per HR bin (``spot_poisson``
    runs only, differentiable); ``aux_losses``: the model's auxiliary losses.
    """

    maps: torch.Tensor
    counts: torch.Tensor | None
    aux_losses: dict[str, torch.Tensor]


def regression_output(model: nn.Module, cond: Any, shape: tuple[int, int, int, int], config: RunConfig,
                      dataset: DatasetSpec | None) -> RegressionOutput:
    """Predict HR maps with a regression model, as ``config.train.regression`` says its output is meant.

    ``"mse"``: the output is the diffusion target, decoded against the interpolated LR maps.
    ``"spot_poisson"``: the output is log-weights around a prior that follows the interpolated LR maps
    (log1p of the interpolated counts per bin); each LR spot's count is shared out over its s x s bins
    (:func:`~diffst.core.spots.share_out_spots`).

    Parameters
    ----------
    model
        The regression model.
    cond
        Its :class:`~diffst.models.base.Conditions` (model-space LR maps), on the model's device.
    shape
        (B, N, H, W) of the HR maps.
    config
        The run's configuration.
    dataset
        The run's :class:`DatasetSpec` (normaliser and scale; needed by ``spot_poisson``).

    Returns
    -------
    RegressionOutput
    """
    from diffst.core.spots import share_out_spots
    from diffst.diffusion.target import decode_target, lr_on_hr_grid
    from diffst.models.base import regress

    out = regress(model, cond, shape)
    if config.train.regression == "mse":
        return RegressionOutput(decode_target(out.prediction, cond.lr, config.diffusion.target, None), None,
                                out.aux_losses)
    if dataset is None:
        raise InputError("a spot_poisson regression needs the run's dataset description (normaliser and scale); "
                         "this checkpoint predates it: train the run again")
    norm, scale = dataset.normaliser, dataset.geometry.scale
    prior = norm.to_log1p(lr_on_hr_grid(cond.lr, shape[-2:]))
    counts = share_out_spots(out.prediction + prior, norm.lr_to_counts(cond.lr, scale), scale)
    return RegressionOutput(norm.to_model(counts), counts, out.aux_losses)


# -- finding checkpoints ------------------------------------------------------------------------------


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    """Name the folder of the checkpoint of ``step``.

    Parameters
    ----------
    run_dir, step
        The run folder and the training step.

    Returns
    -------
    Path
        ``<run_dir>/checkpoints/step_<step, 8 digits>`` (whether it exists or not).
    """
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """List the checkpoints of a run.

    Every ``step_<N>`` folder was complete when it was renamed into place; whether it is still intact is
    for :func:`verify_checkpoint` to say (the loaders call it).

    Parameters
    ----------
    run_dir
        The run folder.

    Returns
    -------
    list of (int, Path)
        ``(step, folder)`` sorted by step; empty without checkpoints.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in folder.iterdir()
             if (m := _NAME.match(child.name)) and child.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Return the most recent checkpoint of a run.

    Parameters
    ----------
    run_dir
        The run folder.

    Returns
    -------
    Path or None
        Its newest ``step_<N>`` folder, None without checkpoints.
    """
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: str | Path) -> Path:
    """Find the checkpoint a path names.

    Parameters
    ----------
    path
        A checkpoint folder, a run folder or a file in a checkpoint folder. A run folder stands for its
        checkpoint of lowest validation loss when training kept one (``train.keep_best``: ``best/``), else
        for its latest checkpoint.

    Returns
    -------
    Path
        The checkpoint folder (not yet verified).

    Raises
    ------
    InputError
        If ``path`` is neither a checkpoint folder nor a run folder with checkpoints.
    """
    path = Path(path)
    if path.is_file():
        path = path.parent
    if _NAME.match(path.name) or (path / STATE).is_file() or (path / MANIFEST).is_file():
        return path  # a checkpoint folder; verify_checkpoint names whatever is wrong with it
    latest = latest_checkpoint(path / BEST_DIR) or latest_checkpoint(path)
    if latest is None:
        raise InputError(
            f"{path} is neither a checkpoint folder (with state.json and model.safetensors) nor a run folder "
            f"with checkpoints under {CHECKPOINT_DIR}/"
        )
    return latest


# -- manifests ----------------------------------------------------------------------------------------


def _damaged(folder: Path, name: str, problem: str) -> InputError:
    return InputError(
        f"checkpoint {folder} is damaged: {name} {problem}. Use an older checkpoint of the run "
        f"({folder.parent}/step_N) or train again."
    )


def write_manifest(folder: Path) -> None:
    """Seal a checkpoint folder: write ``manifest.json`` with the size and sha256 of every file in it.

    Parameters
    ----------
    folder
        The (temporary) checkpoint folder, complete but for the manifest; call this last.
    """
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"format": "diffst-checkpoint-manifest-1", "files": files}, indent=2))


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

    Parameters
    ----------
    folder
        The checkpoint folder.
    names
        The files to check (default: every file training writes).

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
        elif sha256_file(path) != manifest[name]["sha256"]:
            raise _damaged(folder, name, f"does not match its sha256 in {MANIFEST} (changed after saving)")


# -- reading ------------------------------------------------------------------------------------------


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


def _parse_config(path: Path) -> RunConfig:
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data["model"].pop("learn_sigma", None)  # written by older versions; it follows diffusion.learn_sigma
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        # Runs saved before train.spot_ratio_shrink existed answered unshrunk, and their stage two refined that.
        data["train"].setdefault("spot_ratio_shrink", 0.0)
    return parse_config(data, str(path))


def _read_meta(folder: Path) -> tuple[dict[str, Any], RunConfig]:
    """``state.json`` (without the copy of the configuration older versions kept there) and ``config.yaml``."""
    state = _load(folder, STATE, lambda p: json.loads(p.read_text()))
    if not isinstance(state, dict) or "step" not in state:
        raise _damaged(folder, STATE, "holds no training state")
    state.pop("config", None)
    state["step"] = int(state["step"])
    return state, _load(folder, CONFIG, _parse_config)


def _coexpression(model: nn.Module) -> np.ndarray | None:
    """Return the model's co-expression buffer (Diff-ST's gene graph), or None when it has none."""
    found = [b for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] == "coexpression"]
    return found[0].detach().cpu().double().numpy() if found else None


def read_training_state(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read everything in a checkpoint: what training resumes from.

    Files are verified (:func:`verify_checkpoint`) and loaded without unpickling arbitrary objects.

    Parameters
    ----------
    folder
        A checkpoint folder, or a run folder (its latest checkpoint).
    device
        Where to load the tensors.

    Returns
    -------
    dict
        ``model`` and ``ema`` (state dicts), ``optimizer`` (state dict), ``rng``, ``state`` (the contents
        of ``state.json``), ``config`` (RunConfig) and ``path``.

    Raises
    ------
    InputError
        If the checkpoint is missing, damaged or unreadable (the message names the folder and the file).
    """
    folder = find_checkpoint(folder)
    verify_checkpoint(folder)
    state, config = _read_meta(folder)
    return {
        "model": _load(folder, WEIGHTS["model"], lambda p: load_file(p, device=str(device))),
        "ema": _load(folder, WEIGHTS["ema"], lambda p: load_file(p, device=str(device))),
        "optimizer": _load(folder, "optimizer.pt", lambda p: torch.load(p, map_location=device, weights_only=True)),
        "rng": _load(folder, "rng.pt", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
        "state": state,
        "config": config,
        "path": folder,
    }


def load_run(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> Run:
    """Read a trained run back for inference.

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
    Run
        The model in eval mode, its resolved config, dataset spec, co-expression matrix, final entropy
        threshold and step.

    Raises
    ------
    InputError
        If the checkpoint is missing, damaged or unreadable (the message names the folder and the file).
    """
    folder = find_checkpoint(path)
    weights = "ema" if ema else "model"
    verify_checkpoint(folder, (STATE, CONFIG, WEIGHTS[weights]))
    state, config = _read_meta(folder)
    model = build_run_model(config)
    _load(folder, WEIGHTS[weights], lambda p: model.load_state_dict(load_file(p, device="cpu")))
    model.to(device).eval()
    spec = state.get("dataset")
    base = None
    if config.diffusion.target == "regression_residual":
        records = base_run_records(state.get("base_run"))
        if records is None:
            raise _damaged(folder, STATE, "records no base_run (the regression run this two-stage run refines)")
        base = load_base_run([r["path"] for r in records], device, expected_steps=[r.get("step") for r in records],
                             user=folder)
    return Run(model=model, config=config, dataset=DatasetSpec.from_dict(spec) if spec else None,
               coexpression=_coexpression(model), entropy_threshold=state.get("entropy_threshold_final"),
               step=state["step"], path=folder, weights=weights, state=state, base=base)


def base_run_records(recorded: Any) -> list[dict[str, Any]] | None:
    """Read the ``base_run`` entry of a two-stage checkpoint's ``state.json``: a list of ``{path, step}``.

    One base run is recorded as a mapping, a seed ensemble as a list of them; None if the entry is missing
    or malformed.
    """
    records = [recorded] if isinstance(recorded, dict) else recorded
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) and "path" in r for r in records):
        return None
    return records


def base_run_record(base: Run) -> dict[str, Any] | list[dict[str, Any]]:
    """Return what a two-stage checkpoint records of its base run(s) (see :func:`base_run_records`)."""
    records = [{"path": str(r.path), "step": r.step} for r in (base, *base.members)]
    return records[0] if len(records) == 1 else records


def load_base_run(path: str | Path | list[str | Path] | tuple[str | Path, ...], device: str | torch.device = "cpu", *,
                  expected_steps: list[int | None] | None = None, user: str | Path | None = None) -> Run:
    """Load the frozen regression run(s) a two-stage run (``diffusion.target: regression_residual``) refines.

    Parameters
    ----------
    path
        The base run: a run folder (its latest checkpoint) or a checkpoint folder; or a list of them, a seed
        ensemble (the same regression trained with other seeds on the same data), returned as the first run
        with the others as its :attr:`Run.members`.
    device
        Where to put the models.
    expected_steps
        The step of the checkpoint the two-stage run recorded, one per base run; another step is an error.
    user
        The run or checkpoint that needs the base (named in error messages).

    Returns
    -------
    Run
        The base run (EMA weights, eval mode, gradients off).

    Raises
    ------
    InputError
        If a base run is missing, damaged, not a regression run, itself a two-stage run, at another step, or
        (for an ensemble) trained on other genes, normalisation, geometry or settings than the first.
    """
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    steps = list(expected_steps) if expected_steps is not None else [None] * len(paths)
    if not paths or len(steps) != len(paths):
        raise InputError("train.base_run names no regression run; give the folder of a finished regression run")
    runs = [_load_one_base(p, device, s, user) for p, s in zip(paths, steps, strict=True)]
    first = runs[0]
    for other in runs[1:]:
        _check_same_regression(first, other, user)
    first.members = tuple(runs[1:])
    return first


def _load_one_base(path: str | Path, device: str | torch.device, expected_step: int | None,
                   user: str | Path | None) -> Run:
    needed = f" (needed by {user})" if user is not None else ""
    if not Path(path).exists():
        raise InputError(f"base run {path} does not exist{needed}; train the regression run first "
                         "(train.objective: regression) and set train.base_run to its folder")
    base = load_run(path, device)
    if base.config.train.objective != "regression" or base.config.diffusion.target == "regression_residual":
        raise InputError(f"base run {base.path}{needed} is not a plain regression run (its train.objective is "
                         f"{base.config.train.objective!r}, diffusion.target {base.config.diffusion.target!r}); "
                         "train.base_run must name a run trained with train.objective: regression")
    if expected_step is not None and base.step != int(expected_step):
        raise InputError(f"base run checkpoint {base.path}{needed} is at step {base.step}, but the two-stage run was "
                         f"trained on step {expected_step}")
    base.model.requires_grad_(False)
    return base


def _check_same_regression(first: Run, other: Run, user: str | Path | None) -> None:
    """Check that two ensemble members answer the same question the same way (data description, settings)."""
    needed = f" (needed by {user})" if user is not None else ""
    a, b = first.dataset, other.dataset
    same_data = (a is None) == (b is None) and (a is None or a.same_maps(b))
    same_kind = (first.config.train.regression == other.config.train.regression
                 and first.config.diffusion.target == other.config.diffusion.target
                 and first.entropy_threshold == other.entropy_threshold)
    if not (same_data and same_kind):
        raise InputError(f"base runs {first.path} and {other.path}{needed} cannot be averaged: they were trained on "
                         "other genes, normalisation or tile geometry, or with other regression settings; train "
                         "every member of an ensemble from one configuration, changing only its seed")


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """:func:`load_run` as the tuple ``(model, config, extras)`` of earlier versions.

    Parameters
    ----------
    path, device, ema
        As for :func:`load_run`.

    Returns
    -------
    tuple
        The model, the resolved config and ``extras``: ``step``, ``entropy_threshold``, ``dataset`` (dict),
        ``coexpression``, ``weights``, ``path`` and ``state``.
    """
    run = load_run(path, device, ema)
    extras = {"step": run.step, "entropy_threshold": run.entropy_threshold, "dataset": run.state.get("dataset"),
              "coexpression": run.coexpression, "weights": run.weights, "path": run.path, "state": run.state}
    return run.model, run.config, extras
