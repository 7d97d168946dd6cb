"""The training loop: one :class:`Trainer` for every objective.

Data-parallel through HuggingFace Accelerate, resumable bit-for-bit on CPU.

Launch on one process with ``python -m diffst.training --config FILE`` (or ``diffst train``), on several
with ``torchrun --standalone --nproc_per_node K -m diffst.training --config FILE`` or
``accelerate launch --multi_gpu --num_processes K -m diffst.training --config FILE``. On a machine
without CUDA (or with ``device: cpu``) both run K CPU processes over gloo. Note that
``accelerate launch --cpu`` always starts a single process whatever ``--num_processes`` says (Accelerate
routes ``--cpu`` to its simple launcher), so use ``--multi_gpu`` or torchrun for several CPU processes.
Only the main process writes files; every process trains on its own shard of each epoch.

The parts: the train state (:class:`~diffst.training.state.TrainState`: step, model, EMA, optimiser),
the objective (:mod:`diffst.training.objectives`: diffusion or regression), the checkpointer
(:class:`~diffst.training.checkpoint.Checkpointer`) and the metrics logger
(:class:`~diffst.training.metrics.MetricsLogger`). Training never prepares data: ``data.path`` must hold
a prepared dataset (the commands prepare the built-in example first, see :mod:`diffst.demo`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffst.atomic import atomic_output
from diffst.config import ConfigError, RunConfig, resolve_config, save_config
from diffst.core.curriculum import curriculum_threshold
from diffst.diffusion.config import SamplerConfig
from diffst.errors import InputError, TrainingInterrupted
from diffst.models.graph import coexpression_matrix
from diffst.runs import (
    BEST_DIR,
    DatasetSpec,
    Run,
    base_run_record,
    base_run_records,
    checkpoint_folder,
    latest_checkpoint,
    load_base_run,
)
from diffst.training.checkpoint import Checkpointer, clean_temporary, run_lock
from diffst.training.data import (
    STREAM_NOISE,
    STREAM_TORCH,
    STREAM_VAL,
    EpochOrder,
    SeededTiles,
    derive_seed,
    make_loader,
    open_datasets,
    training_tiles,
)
from diffst.training.frozen_base import FrozenBase
from diffst.training.metrics import MetricsLogger, metric_columns, val_columns
from diffst.training.objectives import make_objective
from diffst.training.state import TrainState

__all__ = ["train", "Trainer", "RESUMABLE_CHANGES"]

log = logging.getLogger("diffst.training")

# Settings that may differ between a run and its resumption (they do not change the optimisation path,
# except the length of training, which the user changes on purpose). The sampler is for inference; the one
# sampler setting training reads, a two-stage run's point_views (its base's answer), is kept from the state.
# train.spot_ratio_shrink only forms a regression's answer from its network (runs saved before it existed
# read 0), so runs of any objective resume and are reused across it.
RESUMABLE_CHANGES = {
    "train.steps", "train.epochs", "train.log_every", "train.val_every", "train.val_batches",
    "train.checkpoint_every", "train.keep_last", "train.tensorboard", "train.spot_ratio_shrink",
    "data.num_workers", "device", *(f"sampler.{key}" for key in SamplerConfig.model_fields),
}
DATA_ORDER = ("tiles of epoch e: permutation from (seed, e), dealt round-robin to ranks; augmentation from "
              "(seed, e, tile); noise/timesteps from (seed, rank, step)")


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Train the denoiser ``cfg`` describes with the objective ``cfg.train.objective`` names.

    Same as ``Trainer(cfg).fit(resume)``; see :meth:`Trainer.fit` for the files written.

    Parameters
    ----------
    cfg
        The run configuration (:func:`diffst.config.load_config`); ``data.path`` must hold a prepared
        dataset.
    resume
        Continue from the newest intact checkpoint in ``cfg.run_dir``.

    Returns
    -------
    Path
        The run folder.
    """
    return Trainer(cfg).fit(resume)


class Trainer:
    """Train any denoiser with any objective.

    The data order, augmentation, EMA, checkpoints, resume and data parallelism are the same for all.

    Parameters
    ----------
    cfg
        The run configuration.
    accelerator
        An ``accelerate.Accelerator``; by default one is made from ``cfg.device`` and
        ``cfg.train.mixed_precision``.

    Raises
    ------
    ConfigError
        If ``device: cuda`` is asked for where there is no CUDA.
    """

    def __init__(self, cfg: RunConfig, accelerator: Any = None):
        self.cfg = cfg
        self.accelerator = _make_accelerator(cfg) if accelerator is None else accelerator
        self.main = self.accelerator.is_main_process
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        self.run_dir = Path(cfg.run_dir).resolve()

    def fit(self, resume: bool = False) -> Path:
        """Train to ``train.steps`` (or ``train.epochs``); returns the run folder.

        Parameters
        ----------
        resume
            Continue from the newest intact checkpoint (same step, weights, EMA, optimiser, data order and
            random streams, so the result equals an uninterrupted run); newer damaged ones are skipped with
            a warning and renamed ``step_N.corrupt``. Without a checkpoint, training starts from scratch.
            Without ``resume``, a run folder that already holds checkpoints is an error.

        Returns
        -------
        Path
            ``run_dir``, holding ``config.yaml`` (the resolved configuration, written once at the start),
            ``run_info.json``, ``metrics.csv`` (one row per step: step, epoch, loss, the objective's terms,
            grad_norm, lr, gamma, seconds), ``val.csv`` (when a validation split exists), ``train.log``,
            ``.lock``, ``checkpoints/step_<step>/`` (see :mod:`diffst.runs`) and ``tensorboard/`` (when
            tensorboard is installed).

        Raises
        ------
        InputError
            On bad inputs, e.g. a ``run_dir`` in use by another training process (the run folder is
            locked for the whole run) or a ``data.path`` without a prepared dataset.
        TrainingInterrupted
            After SIGINT / SIGTERM: the current step is finished and a checkpoint written first; the
            message gives the command that resumes.
        """
        if self.main:
            _make_run_dir(self.run_dir)
        # Only the main process writes, so it alone holds the run folder's lock, for the whole run.
        with run_lock(self.run_dir) if self.main else contextlib.nullcontext(), _log_file(self.run_dir, self.main):
            self._setup(resume)
            try:
                with _StopRequest() as stop:
                    self._loop(stop)
                if self.cfg.train.val_every and not self.stopped_early and self.validated_at != self.state.step:
                    self._validate_now()
            finally:
                self.metrics.close()
            self._finish()
        return self.run_dir

    # -- setup and teardown ------------------------------------------------------------------------------

    def _setup(self, resume: bool) -> None:
        cfg = self.cfg
        self.train_ds, self.val_ds, val_note = open_datasets(cfg)
        self.spec = DatasetSpec.from_tiles(self.train_ds)
        self.rcfg = resolve_config(cfg, len(self.spec.genes), self.spec.image_channels)
        checkpoint = self._start(resume)
        tiles = training_tiles(cfg, len(self.train_ds))
        chosen = sorted(set(tiles))
        coexpression = coexpression_matrix(np.asarray(self.train_ds.hr_counts[chosen]))
        self.entropies = np.asarray(self.train_ds.cell_entropy[chosen], dtype=np.float64)
        self.order = EpochOrder(tiles, cfg.data.batch_size, self.world, self.rank, cfg.seed)
        spe = self.order.steps_per_epoch
        self.total = cfg.train.steps if cfg.train.steps is not None else cfg.train.epochs * spe
        saved = (checkpoint or {}).get("state", {})
        # Model selection (train.keep_best): the lowest validation loss so far, and an early stop is final.
        self.best = saved.get("best")
        self.since_best = int(saved.get("validations_since_best", 0))
        self.stopped_early = bool(saved.get("stopped_early", False))
        self.validated_at: int | None = None
        if self.stopped_early:
            self.total = int(saved["step"])
        if cfg.train.keep_best and self.val_ds is None:
            raise InputError(f"train.keep_best needs a validation split, but {val_note}; prepare the data with a "
                             "validation region (diffst prepare --val-region) or set train.keep_best: false")
        self.gamma_final = self._gamma(1.0)
        prior = self._fit_linear_prior(chosen) if checkpoint is None else None
        self.state = TrainState.create(self.rcfg, coexpression, self.accelerator, checkpoint, prior)
        self.base = self._base_run(checkpoint)
        # The base's answer averages this many views: as recorded when resuming, else the sampler's.
        self.base_views = int((checkpoint or {}).get("state", {}).get("base_views", self.rcfg.sampler.point_views))
        self.objective = make_objective(self.rcfg, self._frozen_base(self.train_ds), self.spec)
        # Validation tiles are another split's (or, with a held-out share, the training split's own).
        same = self.val_ds is None or getattr(self.val_ds, "dataset", self.val_ds).split == self.train_ds.split
        self.val_objective = (self.objective if same else
                              make_objective(self.rcfg, self._frozen_base(self.val_ds), self.spec))
        self.view = SeededTiles(self.train_ds, cfg.seed)
        self.info = {
            "world_size": self.world, "device": str(self.device),
            "distributed_type": str(self.accelerator.distributed_type), "objective": self.rcfg.train.objective,
            "n_train_tiles": len(tiles), "steps_per_epoch": spe, "total_steps": self.total,
            "effective_batch_size": cfg.data.batch_size * self.world, "validation": val_note,
            "started_at_step": self.state.step, "n_parameters": sum(p.numel() for p in self.state.model.parameters()),
        }
        if self.base is not None:
            self.info["base_run"] = self._base_record()
        val_cols = val_columns(tuple(self.objective.val_terms)) if self.val_ds is not None else None
        self.metrics = MetricsLogger(self.run_dir, metric_columns(self.objective.terms), val_cols,
                                     self.state.step if checkpoint is not None else None,
                                     self.rcfg.train.tensorboard, enabled=self.main)
        if self.main:
            save_config(self.rcfg, self.run_dir / "config.yaml")
            _write_json(self.run_dir / "run_info.json", self.info)
            log.info("run %s: %s", self.run_dir, json.dumps(self.info))

    def _fit_linear_prior(self, tiles: list[int]) -> dict[str, Any] | None:
        """Fit a spot-ratio model's linear prior on the training tiles (``train.linear_prior``), or None.

        Every process fits the same prior from the same tiles (no augmentation), so no broadcast is needed.
        """
        train = self.rcfg.train
        if not (train.objective == "regression" and train.regression == "spot_poisson" and train.linear_prior):
            return None
        from diffst.data.dataset import PreparedTiles
        from diffst.evaluation.report import scoring_mask
        from diffst.models.spot_ratio import fit_linear_prior, n_prior_features

        tiles_ds = PreparedTiles(self.cfg.data.path, self.cfg.data.train_split, augment=False)
        norm, scale = self.spec.normaliser, self.spec.geometry.scale
        mask = scoring_mask(tiles_ds)
        log1p_scale = torch.as_tensor(np.asarray(norm.scale, dtype=np.float32)).reshape(-1)  # as to_log1p uses

        def batches():
            for start in range(0, len(tiles), 16):
                idx = tiles[start:start + 16]
                lr = norm.lr_to_model(np.asarray(tiles_ds.lr_counts[idx], dtype=np.float32), scale)
                hr = np.asarray(tiles_ds.hr_counts[idx], dtype=np.float32)
                keep = np.ones((len(idx), *hr.shape[-2:]), bool) if mask is None else mask[idx]
                yield {"lr": torch.from_numpy(np.ascontiguousarray(lr)),
                       "tissue": torch.from_numpy(np.asarray(tiles_ds.tissue[idx], dtype=np.float32) / 255.0),
                       "hr_counts": torch.from_numpy(hr), "mask": torch.from_numpy(keep)}

        prior = fit_linear_prior(batches(), log1p_scale, n_prior_features(self.spec.image_channels))
        log.info("linear prior fitted on %d training tiles", len(tiles))
        return prior

    def _start(self, resume: bool) -> dict[str, Any] | None:
        """Find the checkpoint to resume from (its configuration checked against this one), or None."""
        self.checkpointer = Checkpointer(self.run_dir, self.rcfg.train.keep_last, self.main)
        if resume and self.main:
            clean_temporary(self.run_dir)
        self.accelerator.wait_for_everyone()
        checkpoint = self.checkpointer.start(resume)
        if checkpoint is not None:
            _check_resume_config(checkpoint["config"], self.rcfg)
        return checkpoint

    def _base_run(self, checkpoint: dict[str, Any] | None) -> Run | None:
        """Load the frozen regression run of a two-stage run (on resume: the checkpoint it recorded), or None."""
        if self.rcfg.diffusion.target != "regression_residual":
            return None
        recorded = base_run_records((checkpoint or {}).get("state", {}).get("base_run"))
        if recorded:
            base = load_base_run([r["path"] for r in recorded], self.device,
                                 expected_steps=[r["step"] for r in recorded], user=self.run_dir)
        else:
            base = load_base_run(self.rcfg.train.base_run, self.device, user=self.run_dir)
        spec = base.dataset
        if spec is not None and not spec.same_maps(self.spec):
            raise InputError(f"base run {base.path} was trained on other genes, normalisation or tile geometry than "
                             f"{self.cfg.data.path}; train the regression run on the same prepared dataset")
        return base

    def _frozen_base(self, dataset) -> FrozenBase | None:
        """Return the base run's answers for the tiles of ``dataset``'s split (None without a base run)."""
        if self.base is None:
            return None
        split = getattr(dataset, "dataset", dataset).split
        return FrozenBase(self.base, self.cfg.data.path, split, self.base_views)

    def _base_record(self) -> dict[str, Any] | list[dict[str, Any]]:
        return base_run_record(self.base)

    def _finish(self) -> None:
        sums = self.accelerator.gather(
            torch.tensor([_param_checksum(self.state.model)], dtype=torch.float64, device=self.device))
        if self.main:
            self.info.update(finished=True, final_step=self.state.step,
                             rank_weight_checksums=[float(x) for x in sums.cpu()],
                             final_checkpoint=str(latest_checkpoint(self.run_dir)))
            if self.cfg.train.keep_best:
                self.info.update(best=self.best, stopped_early=self.stopped_early,
                                 best_checkpoint=str(latest_checkpoint(self.run_dir / BEST_DIR)))
            _write_json(self.run_dir / "run_info.json", self.info)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    # -- the loop ----------------------------------------------------------------------------------------

    def _loop(self, stop: _StopRequest) -> None:
        st, train = self.state, self.cfg.train
        bar = tqdm(total=self.total, initial=st.step, disable=not self.main, dynamic_ncols=True, desc="train")
        st.wrapped.train()
        try:
            while st.step < self.total:
                epoch, offset = divmod(st.step, self.order.steps_per_epoch)
                for batch in make_loader(self.view, self.order.batches(epoch, offset), self.cfg.data.num_workers):
                    row, stopping = self._step(batch, epoch, stop)
                    shown = st.step % train.log_every == 0 or st.step == self.total
                    self.metrics.step(row, to_tensorboard=shown)
                    bar.update(1)
                    if shown:
                        bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", *self.objective.terms[:2])
                                         if row[k] is not None})
                    if train.val_every and st.step % train.val_every == 0 and st.step < self.total:
                        self._validate_now()
                        if self._stop_early():
                            self.total = st.step  # the final checkpoint below records the stop
                    if st.step % train.checkpoint_every == 0 or st.step == self.total or stopping:
                        self._checkpoint(row["gamma"])
                    if stopping:
                        raise _interrupted(self.run_dir, st.step, stop.signal)
                    if st.step >= self.total:
                        break
        finally:
            bar.close()

    def _step(self, batch: dict[str, torch.Tensor], epoch: int, stop: _StopRequest) -> tuple[dict[str, Any], bool]:
        """One optimiser step; returns the metrics row (averaged over processes) and whether to stop now."""
        cfg, st = self.cfg, self.state
        started = time.perf_counter()
        gamma = self._gamma(st.step / self.total)
        torch.manual_seed(derive_seed(cfg.seed, STREAM_TORCH, self.rank, st.step))  # dropout etc.
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, STREAM_NOISE, self.rank, st.step))
        loss, terms = self.objective(st.wrapped, batch, gamma, generator, self.device)
        grad_norm = st.update(self.accelerator, loss, cfg.train.grad_clip)
        names = self.objective.terms
        missing = torch.tensor(float("nan"), device=self.device)
        values = torch.stack([loss.detach().float(), *(terms[n].detach().float() if n in terms else missing
                                                       for n in names),
                              torch.tensor(float(stop.signal is not None), device=self.device)])
        values = self.accelerator.reduce(values, "mean").tolist()  # also tells every rank that one was signalled
        row = {"step": st.step, "epoch": epoch, "loss": values[0],
               **{n: (v if n in terms else None) for n, v in zip(names, values[1:-1], strict=True)},
               "grad_norm": grad_norm, "lr": st.optimizer.param_groups[0]["lr"], "gamma": gamma,
               "seconds": round(time.perf_counter() - started, 4)}
        return row, values[-1] > 0 and st.step < self.total

    def _gamma(self, progress: float) -> float | None:
        """Return the curriculum's entropy threshold at ``progress`` in [0, 1] (None: every cell patch)."""
        train = self.rcfg.train
        if not train.curriculum:
            return None
        g = curriculum_threshold(progress, self.entropies, train.curriculum_milestones, train.curriculum_quantiles)
        return float(g) if math.isfinite(g) else None

    # -- checkpoints and validation --------------------------------------------------------------------

    def _checkpoint(self, gamma: float | None) -> None:
        if self.main:
            self._save(self.checkpointer, gamma)
        self.accelerator.wait_for_everyone()

    def _save(self, checkpointer: Checkpointer, gamma: float | None) -> None:
        """Write this step's checkpoint with ``checkpointer`` (main process only)."""
        st = self.state
        epoch, offset = divmod(st.step, self.order.steps_per_epoch)
        state = {
            "epoch": epoch, "batch_in_epoch": offset, "steps_per_epoch": self.order.steps_per_epoch,
            "total_steps": self.total, "world_size": self.world, "seed": self.cfg.seed,
            "ema_updates": st.ema.num_updates, "entropy_threshold": gamma,
            "entropy_threshold_final": self.gamma_final, "data_order": DATA_ORDER,
            "weights_for_inference": "ema.safetensors",
            # What inference needs to put new data into this model's space and back to counts.
            "dataset": self.spec.to_dict(),
        }
        if self.base is not None:
            state["base_run"] = self._base_record()  # the frozen regression run (load_run reads it)
            state["base_views"] = self.base_views
        if self.cfg.train.keep_best:
            state.update(best=self.best, validations_since_best=self.since_best, stopped_early=self.stopped_early)
        path = checkpointer.save(st.step, model=st.model, ema_state=st.ema.state_dict(),
                                 optimizer=st.optimizer, state=state, config=self.rcfg)
        log.info("checkpoint %s", path)

    def _track_best(self, values: dict[str, float], gamma: float | None) -> None:
        """Keep the checkpoint of the lowest validation loss (EMA weights) under ``<run_dir>/best/``."""
        loss = values.get("val_loss_ema")
        if loss is None or not math.isfinite(loss):
            self.since_best += 1
            return
        if self.best is not None and loss >= self.best["val_loss"]:
            self.since_best += 1
            return
        self.best, self.since_best = {"step": self.state.step, "val_loss": float(loss)}, 0
        best_dir = self.run_dir / BEST_DIR
        self._save(Checkpointer(best_dir, keep_last=1, main=self.main), gamma)
        log.info("step %d: lowest validation loss so far (%.5f), kept in %s", self.state.step, loss, best_dir)

    def _stop_early(self) -> bool:
        """Whether ``train.patience`` validation passes went by without a new lowest loss (same on every process)."""
        patience = self.cfg.train.patience
        flag = torch.tensor([float(bool(patience) and self.main and self.since_best >= patience)], device=self.device)
        self.stopped_early = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        if self.stopped_early and self.main:
            log.info("early stop at step %d: %d validations without a lower loss (best step %d)", self.state.step,
                     self.since_best, self.best["step"] if self.best else -1)
        return self.stopped_early

    def _validate_now(self) -> None:
        if self.val_ds is not None and self.main:
            values = self._validate()
            self.metrics.validation({"step": self.state.step, "split": self.cfg.data.val_split, **values})
            log.info("step %d validation %s", self.state.step, values)
            if self.cfg.train.keep_best:
                self._track_best(values, self._gamma(self.state.step / self.total))
        self.validated_at = self.state.step
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Average the validation terms of the live and the EMA weights.

        Timesteps and noise are fixed: the same for every call.
        """
        from torch.utils.data import DataLoader

        cfg, objective = self.cfg, self.val_objective
        loader = DataLoader(self.val_ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0)
        out: dict[str, float] = {}
        for tag, model in (("", self.state.model), ("_ema", self.state.ema.model)):
            was_training = model.training
            model.eval()
            sums, count = dict.fromkeys(objective.val_terms, 0.0), 0
            for i, batch in enumerate(loader):
                if cfg.train.val_batches is not None and i >= cfg.train.val_batches:
                    break
                generator = torch.Generator().manual_seed(derive_seed(cfg.seed, STREAM_VAL, i))
                _, terms = objective(model, batch, self.gamma_final, generator, self.device)
                n = batch["hr"].shape[0]
                for column, term in objective.val_terms.items():
                    if term in terms:
                        sums[column] += float(terms[term]) * n
                count += n
            model.train(was_training)
            out.update({f"val_{k}{tag}": v / max(count, 1) for k, v in sums.items()})
        return out


# -- helpers ------------------------------------------------------------------------------------------------


def _make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but CUDA is not available; use 'auto' or 'cpu'")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)]
    return Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.train.mixed_precision, kwargs_handlers=handlers)


def _make_run_dir(run_dir: Path) -> None:
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"cannot create run_dir {run_dir}: {blocker} is a file, not a folder; choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create run_dir {run_dir} ({exc.strerror}); choose a folder you can write to") from None


@contextlib.contextmanager
def _log_file(run_dir: Path, main: bool) -> Iterator[None]:
    """Inside ``with``: the training log also goes to ``<run_dir>/train.log`` (main process)."""
    if not main:
        yield
        return
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    with atomic_output(path, directory=False) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _param_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() + p.detach().double().sum() for p in model.parameters()))
