"""Prediction: sample HR maps for prepared tiles and write them as AnnData.

Samples are brought back to counts, tiles stitched into one grid per sample, one row per HR bin. Runs are read through the run layer (:func:`diffst.runs.load_run`); nothing here imports training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffst.core.spots import project_to_spots
from diffst.data.dataset import PreparedTiles
from diffst.diffusion.config import SamplerConfig
from diffst.diffusion.process import GaussianDiffusion
from diffst.diffusion.samplers import sample_with_config, sampling_autocast, x0_probe
from diffst.diffusion.target import decode_target
from diffst.errors import InputError
from diffst.inference.intervals import LEVELS, interval_bounds
from diffst.inference.store import dataset_maps
from diffst.memory import release_memory, release_pages
from diffst.models.base import Conditions, bind_conditions
from diffst.runs import Run, load_run, regression_point

log = logging.getLogger("diffst.inference")


@dataclass
class TilePredictions:
    """Per-tile predictions of one split, in counts per HR bin.

    mean: (T, N, H, W) the point estimate (``SamplerConfig.point_estimate``: a two-stage run's regression
    stage, the x0-probe estimate of the posterior mean, or the mean over the K samples); std: (T, N, H, W) the samples'
    standard deviation (zeros when K = 1); samples_model: (K, T, N, H, W) sampled HR maps in model space, or
    None when they were not kept (``keep_samples=False``; ``k`` then says how many were drawn);
    bounds: for sampling runs, the central 50 % and 90 % intervals of each bin's observed count (``q25``,
    ``q75``, ``q05``, ``q95``, each (T, N, H, W): :func:`diffst.inference.intervals.interval_bounds` of the
    samples around the point estimate, ``sampler.interval_spread`` applied); empty for regressions.
    """

    mean: np.ndarray
    std: np.ndarray
    samples_model: np.ndarray | None = None
    bounds: dict[str, np.ndarray] = field(default_factory=dict)
    k: int | None = None

    @property
    def num_samples(self) -> int:
        """K, the samples drawn per tile (1 for a regression run)."""
        if self.samples_model is not None:
            return int(self.samples_model.shape[0])
        return int(self.k or 1)

    def tile_layers(self, i: int) -> dict[str, np.ndarray]:
        """Return the layers of tile ``i`` (``mean``, ``std`` and the interval bounds), each (N, H, W)."""
        return {"mean": self.mean[i], "std": self.std[i], **{k: v[i] for k, v in self.bounds.items()}}


@dataclass
class BatchPredictions:
    """The predictions of one batch of consecutive tiles (:func:`iter_batches`), in counts per HR bin.

    ``indices`` are the tiles' positions in the split; ``mean``, ``std`` and each ``bounds`` entry are
    (B, N, H, W); ``samples_model`` is (K, B, N, H, W) in model space.
    """

    indices: list[int]
    mean: np.ndarray
    std: np.ndarray
    samples_model: np.ndarray
    bounds: dict[str, np.ndarray] = field(default_factory=dict)

    def tile_layers(self, j: int) -> dict[str, np.ndarray]:
        """Return the layers of the batch's ``j``-th tile (``mean``, ``std``, interval bounds), each (N, H, W)."""
        return {"mean": self.mean[j], "std": self.std[j], **{k: v[j] for k, v in self.bounds.items()}}


def point_estimate_kind(run: Run, sampler: SamplerConfig) -> str:
    """Return the point estimate a prediction of ``run`` reports: ``sampler.point_estimate``, ``auto`` resolved.

    ``auto`` is ``base`` for a two-stage run (its regression stage) and ``x0_probe`` for other diffusion
    runs; a regression run's only estimate is its prediction (reported as ``base``).

    Raises
    ------
    InputError
        If ``base`` is asked of a run that has no regression stage.
    """
    if run.config.train.objective == "regression":
        return "base"
    if sampler.point_estimate == "auto":
        return "base" if run.base is not None else "x0_probe"
    if sampler.point_estimate == "base" and run.base is None:
        raise InputError(f"point_estimate 'base' needs a two-stage run (diffusion.target: regression_residual); "
                         f"{run.path} has no regression stage: use x0_probe or sample_mean.")
    return sampler.point_estimate


def num_samples_of(run: Run, sampler: SamplerConfig) -> int:
    """K, the samples a prediction of ``run`` draws per tile: 1 for a regression run, else ``sampler.num_samples``."""
    return 1 if run.config.train.objective == "regression" else sampler.num_samples


@torch.no_grad()
def iter_batches(
    run: Run,
    dataset: PreparedTiles,
    sampler: SamplerConfig,
    *,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    skip: Callable[[int, list[int]], bool] | None = None,
) -> Iterator[BatchPredictions]:
    """Predict the tiles of ``dataset`` batch by batch; memory is that of one batch (K x batch_size maps).

    Batch b holds tiles ``b * batch_size`` to ``(b + 1) * batch_size - 1``, and its noise comes from a
    generator seeded with (seed, b), so a batch's result depends on nothing else: not on what else runs
    nor on which batches were skipped (``skip(b, indices)`` True: e.g. its tiles are already done).

    Yields
    ------
    BatchPredictions
        Point estimate, std and interval bounds in counts (spot-consistent when ``sampler.spot_consistent``)
        and the K samples in model space.
    """
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: give at least one tile per batch (--batch-size 1 or more).")
    device = torch.device(device)
    model, cfg = run.model.to(device).eval(), run.config
    regression = cfg.train.objective == "regression"
    diffusion = GaussianDiffusion(cfg.diffusion)
    n, geom = len(dataset), dataset.geometry
    shape_hr = (len(dataset.genes), geom.tile_hr, geom.tile_hr)
    k = num_samples_of(run, sampler)
    estimate = point_estimate_kind(run, sampler)
    norm = dataset.normaliser
    for b, start in enumerate(range(0, n, batch_size)):
        idx = list(range(start, min(start + batch_size, n)))
        if skip is not None and skip(b, idx):
            continue
        batch = torch.utils.data.default_collate([dataset[i] for i in idx])
        cond = Conditions.from_batch(batch, run.entropy_threshold).to(device)
        # A two-stage run's samples are residuals over its frozen regression run's prediction.
        base = run.base.predict_hr(batch, device, views=sampler.point_views) if run.base is not None else None
        if regression:
            hr = regression_point(run.models, cond, (len(idx), *shape_hr), cfg, run.dataset, sampler.point_views)[None]
            x0_point = hr[0]
        else:
            # Encoded once per batch, not at every sampler step: the conditions depend on neither x nor t.
            denoise = bind_conditions(model, cond, shape_hr[1:])

            def model_fn(x, t, denoise=denoise):
                return denoise(x, t).prediction

            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
            # The K samples run as one batch (one network call per step for all of them), in mixed precision
            # where the device has it natively.
            with sampling_autocast(device):
                _, _, drawn = sample_with_config(model_fn, (len(idx), *shape_hr), diffusion, sampler, generator,
                                                 device=device, batch_samples=True)
            hr = torch.stack([decode_target(d, cond.lr, cfg.diffusion.target, base) for d in drawn])
            x0_point = base
            if estimate == "x0_probe":
                x0 = x0_probe(model_fn, (len(idx), *shape_hr), diffusion, sampler.probe_draws, generator,
                              device=device, clip=sampler.clip)
                x0_point = decode_target(x0, cond.lr, cfg.diffusion.target, base)
        samples = hr.float().cpu().numpy()
        # The answer (X) is a posterior-mean estimate unless the samples' mean is asked for.
        point = None if estimate == "sample_mean" else x0_point.float().cpu().numpy()
        del hr, x0_point
        counts = norm.to_counts(samples)
        mean = counts.mean(axis=0) if point is None else norm.to_counts(point)
        if sampler.spot_consistent:
            lr = np.asarray(dataset.lr_counts[start : idx[-1] + 1], np.float32)
            mask = np.asarray(dataset.lr_mask[start : idx[-1] + 1], bool)
            counts = project_to_spots(counts, lr, geom.scale, mask)
            samples = norm.to_model(counts).astype(np.float32)
            mean = project_to_spots(mean, lr, geom.scale, mask) if point is not None else counts.mean(axis=0)
        std = counts.std(axis=0, ddof=1) if k > 1 else np.zeros_like(mean)
        bounds = {} if regression else interval_bounds(counts, mean, sampler.interval_spread)
        if b % max(1, 64 // batch_size) == 0:  # pages of tiles read so far need not stay resident
            release_pages(*dataset_maps(dataset))
            release_memory()
        yield BatchPredictions(indices=idx, mean=mean, std=std, samples_model=samples, bounds=bounds)


def _sampling_description(run: Run, sampler: SamplerConfig) -> str:
    if run.config.train.objective == "regression":
        return "Predicting (regression)"
    return f"Sampling ({sampler.method}, {sampler.steps or 'all'} steps, K={num_samples_of(run, sampler)})"


@torch.no_grad()
def predict_tiles(
    run: Run,
    dataset: PreparedTiles,
    sampler: SamplerConfig,
    *,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    keep_samples: bool = True,
) -> TilePredictions:
    """Draw ``sampler.num_samples`` HR samples for every tile of ``dataset``, all results in memory.

    Tiles are processed in batches (:func:`iter_batches`); the noise of batch b comes from a generator
    seeded with (seed, b), so results do not depend on what else runs and are reproducible from the seed.
    A run trained with the regression objective gives one deterministic prediction per tile (K = 1). The
    per-tile layers (T x N x H x W each) are held for all tiles; for a whole slide, stream them to disk
    instead (:func:`predict_to_store`).

    Parameters
    ----------
    run
        The trained run (:func:`diffst.runs.load_run`): model, diffusion settings, entropy threshold.
    dataset
        The tiles, read through the run's normaliser.
    sampler
        Method, steps, K, eta and clipping (see :func:`diffst.diffusion.samplers.sample_with_config`).
    batch_size, seed, device, progress
        Tiles per batch (its K samples run together: K x batch_size maps per network call), noise seed, where
        to run, progress bar (tiles/s and ETA).
    keep_samples
        Keep the K samples of every tile (``samples_model``, K x T x N x H x W, gathered batch by batch);
        False keeps only the per-tile layers.

    Returns
    -------
    TilePredictions
    """
    n, geom = len(dataset), dataset.geometry
    shape = (n, len(dataset.genes), geom.tile_hr, geom.tile_hr)
    mean, std = np.empty(shape, np.float32), np.empty(shape, np.float32)
    bounds: dict[str, np.ndarray] = {}
    samples: list[np.ndarray] = []
    with tqdm(total=n, desc=_sampling_description(run, sampler), unit="tile", disable=not progress) as bar:
        for part in iter_batches(run, dataset, sampler, batch_size=batch_size, seed=seed, device=device):
            sl = slice(part.indices[0], part.indices[-1] + 1)
            mean[sl], std[sl] = part.mean, part.std
            for key, value in part.bounds.items():
                bounds.setdefault(key, np.empty(shape, np.float32))[sl] = value
            if keep_samples:
                samples.append(part.samples_model)
            bar.update(len(part.indices))
    k = num_samples_of(run, sampler)
    kept = np.concatenate(samples, axis=1) if keep_samples and samples else None
    if kept is None and keep_samples:
        kept = np.empty((k, 0, *shape[1:]), np.float32)
    return TilePredictions(mean=mean, std=std, samples_model=kept, bounds=bounds, k=k)


def predict_to_store(
    run: Run,
    dataset: PreparedTiles,
    sampler: SamplerConfig,
    store,
    *,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    source: str | Path | None = None,
    on_batch: Callable[[BatchPredictions], None] | None = None,
) -> dict[str, int]:
    """Predict every tile not yet in ``store`` and write each tile's layers there as soon as its batch is done.

    Memory is that of one batch, whatever the number of tiles: neither the K samples nor the per-tile
    layers of other batches are held. A batch whose tiles are all in the store (from an interrupted run
    with the same setup: :class:`diffst.inference.store.TileStore`) is skipped; the others are sampled with
    the same per-batch seeds as an uninterrupted run would use, so the result is the same bit for bit.

    Parameters
    ----------
    run, dataset, sampler, batch_size, seed, device, progress
        As for :func:`predict_tiles`; the progress bar counts tiles (tiles/s and ETA), reused ones included.
    store
        An open :class:`~diffst.inference.store.TileStore` whose identity includes the batch size and seed.
    source
        Named in the error when the model produces non-finite values (default: the run's path).
    on_batch
        Called with each batch's predictions after its tiles are written (progress reporting, tests).

    Returns
    -------
    dict
        ``n_tiles``, ``reused`` (tiles found finished) and ``predicted`` (tiles sampled now).

    Raises
    ------
    InputError
        If the model produces NaN or infinity (nothing of that batch is written).
    """
    n = len(dataset)
    finished = {i for i in store.finished() if i < n}
    batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    # A batch is redone unless all its tiles are there (they are written together, so that is rare).
    reused = sum(len(b) for b in batches if all(i in finished for i in b))
    if reused:
        log.info("Resuming: %d of %d tiles were already predicted (%s); predicting the other %d.",
                 reused, n, store.path, n - reused)
    predicted = 0
    with tqdm(total=n, initial=reused, desc=_sampling_description(run, sampler), unit="tile",
              disable=not progress) as bar:
        parts = iter_batches(run, dataset, sampler, batch_size=batch_size, seed=seed, device=device,
                             skip=lambda _b, idx: all(i in finished for i in idx))
        for part in parts:
            if not (np.isfinite(part.mean).all() and np.isfinite(part.std).all()):
                check_finite(TilePredictions(mean=part.mean, std=part.std), source or run.path)
            for j, i in enumerate(part.indices):
                store.write(i, part.tile_layers(j))
            predicted += len(part.indices)
            bar.update(len(part.indices))
            if on_batch is not None:
                on_batch(part)
    release_pages(*dataset_maps(dataset))
    release_memory()
    return {"n_tiles": n, "reused": reused, "predicted": predicted}


def stitch(tiles: pd.DataFrame, maps: dict[str, np.ndarray], hr_bin_um: float,
           window: np.ndarray | None = None) -> pd.DataFrame:
    """Average overlapping tiles of one sample onto its HR grid.

    ``tiles`` has x0_um / y0_um per tile; ``maps`` holds arrays (T, N, H, W) to stitch (a ``std``
    entry is combined as the root of the mean variance). ``window`` (H, W) weights each tile's bins
    (e.g. :func:`diffst.inference.whole_slide.tile_window`, which fades tiles out towards their edges);
    None weighs all bins alike. Returns a long table with one row per covered bin: ``row``, ``col``,
    ``x_um``, ``y_um`` (bin centre) and, per map, an (n, N) array under ``attrs``.
    """
    gx0, gy0 = tiles["x0_um"].min(), tiles["y0_um"].min()
    first = next(iter(maps.values()))
    _, n_genes, h, w = first.shape
    offs_c = np.round((tiles["x0_um"].to_numpy() - gx0) / hr_bin_um).astype(int)
    offs_r = np.round((tiles["y0_um"].to_numpy() - gy0) / hr_bin_um).astype(int)
    grid_h, grid_w = offs_r.max() + h, offs_c.max() + w
    weight = np.ones((h, w)) if window is None else np.asarray(window, float)
    count = np.zeros((grid_h, grid_w))
    sums = {k: np.zeros((n_genes, grid_h, grid_w)) for k in maps}
    for j, (r, c) in enumerate(zip(offs_r, offs_c, strict=True)):
        count[r : r + h, c : c + w] += weight
        for key, arr in maps.items():
            value = arr[j] ** 2 if key == "std" else arr[j]
            sums[key][:, r : r + h, c : c + w] += weight * value
    rows, cols = np.nonzero(count)
    table = pd.DataFrame({"row": rows, "col": cols, "x_um": gx0 + (cols + 0.5) * hr_bin_um,
                          "y_um": gy0 + (rows + 0.5) * hr_bin_um})
    stitched = {}
    for key, total in sums.items():
        avg = total[:, rows, cols] / count[rows, cols]
        stitched[key] = np.sqrt(avg).T if key == "std" else avg.T
    table.attrs["maps"] = stitched
    return table


def to_anndata(dataset: PreparedTiles, preds: TilePredictions, *, extra_uns: dict | None = None,
               blend: str = "mean"):
    """AnnData with one row per HR bin of every sample in the split (overlapping tiles averaged).

    Built band by band (:func:`diffst.inference.output.build_anndata`); for a whole slide write the file as
    it is stitched instead (:func:`diffst.inference.output.write_h5ad_stream`, same content).

    Parameters
    ----------
    ``blend`` is how overlapping tiles are combined: ``mean`` (plain average) or ``window`` (weighted by
    :func:`diffst.inference.whole_slide.tile_window`, no visible tile edges; then ``uns['diffst']['seams']``
    holds :func:`~diffst.inference.whole_slide.seam_jump` of ``X`` per sample).

    Writes
    ------
    ``X``: predicted mean counts per HR bin (float32); ``layers['std']``: per-bin standard deviation
    over the K samples (when K > 1); ``layers['q05']``, ``['q25']``, ``['q75']``, ``['q95']``: bounds of
    the central 90 % and 50 % intervals of each bin's observed count (sampling runs; averaged where tiles
    overlap); ``layers['observed']``: measured HR counts (when the dataset has them); ``obs``: ``sample``, ``row``, ``col``, ``x_um``, ``y_um``; ``obsm['spatial']``: bin centres
    in the sample's full-resolution image pixels; ``obsm['spatial_um']``: the same in microns;
    ``var_names``: genes; ``uns['spatial'][sample]`` for squidpy / scanpy plotting over the histology:
    ``images['hires']`` ((H, W, 3) uint8 RGB, longest side at most 2000 px, rebuilt from the split's tile
    images (:func:`diffst.inference.output.slide_histology`: averaged over pixel blocks first when the mosaic
    would be finer than the hires image) and placed in the full-resolution pixel frame)
    and ``scalefactors`` (``tissue_hires_scalef``: hires pixels per full-resolution pixel,
    ``spot_diameter_fullres``: the bin side in full-resolution pixels, ``bin_size_um``,
    ``microns_per_pixel``) and ``metadata`` (``source_image``); ``uns['diffst']``: geometry, split,
    n_tiles, num_samples and whatever ``extra_uns`` holds (the command line adds the record of
    :func:`diffst.inference.provenance.prediction_provenance`: checkpoint and step, sampler, seed, K,
    versions, input files with sizes and sha256).
    """
    from diffst.inference.output import MemoryTiles, build_anndata

    return build_anndata(dataset, MemoryTiles(preds), extra_uns=extra_uns, blend=blend)


def is_diffst_prediction(path: Path) -> bool:
    """Tell whether ``path`` is an .h5ad that Diff-ST wrote (it carries ``uns['diffst']``)."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return "uns" in fh and "diffst" in fh["uns"]
    except (OSError, ValueError):
        return False


def write_h5ad(adata, path: str | Path) -> Path:
    """Write atomically: a failure never leaves a half-written file at ``path`` (nor litter beside it)."""
    from diffst.atomic import atomic_output

    path = Path(path)
    with atomic_output(path, directory=False) as tmp:
        adata.write_h5ad(tmp)
    return path


def check_finite(preds: TilePredictions, source: str | Path) -> None:
    """Refuse to hand on predictions that hold NaN or infinity."""
    bad = ~np.isfinite(preds.mean)
    if bad.any() or not np.isfinite(preds.std).all():
        raise InputError(
            f"The model in {source} produced non-finite values (NaN or infinity) in {bad.mean():.1%} of the predicted "
            "bins, so nothing was written. Its weights are probably corrupt or its training diverged (look for NaN "
            "in metrics.csv); use an earlier checkpoint or train again."
        )


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; asking for CUDA where there is none is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"Unknown device '{device}'; use auto, cpu or cuda.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device '{device}' was requested but this machine has no usable CUDA GPU; use --device cpu "
                         "or auto.")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"Device '{device}' is not supported; use auto, cpu or cuda.")
    return dev


def check_sample_memory(n_tiles: int, n_genes: int, tile_hr: int, k: int) -> None:
    """Refuse a number of samples K whose arrays would not fit in half of this machine's memory."""
    # K samples in model space plus their counts, and mean/std/observed per tile, all float32.
    needed = 4 * n_tiles * n_genes * tile_hr * tile_hr * (2 * k + 3)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    if needed > total / 2:
        k_max = max(1, int((total / 2 / (4 * n_tiles * n_genes * tile_hr * tile_hr) - 3) // 2))
        raise InputError(
            f"--samples {k} would need {needed / 2**30:.1f} GB for {n_tiles} tiles of {n_genes} genes, more than half "
            f"of this machine's {total / 2**30:.0f} GB; use --samples {k_max} or fewer."
        )


def run_sampler(run: Run, given: SamplerConfig | Mapping[str, Any] | None = None) -> SamplerConfig:
    """Choose the sampler settings: the run's own ``sampler:`` section, overridden by ``given``.

    Parameters
    ----------
    run
        The trained run.
    given
        A complete :class:`SamplerConfig` (used as it is), a mapping of the settings to change (e.g.
        ``{"steps": 50}``; changing the method away from DDIM drops the run's DDIM eta) or None.

    Returns
    -------
    SamplerConfig
        The validated settings (a DDIM eta given for another method is refused here).

    Raises
    ------
    InputError
        If the steps exceed the model's diffusion steps.
    """
    if isinstance(given, SamplerConfig):
        sampler = given
    else:
        values = {**run.config.sampler.model_dump(), **(given or {})}
        if values["method"] != "ddim" and "eta" not in (given or {}):
            values["eta"] = 0.0
        sampler = SamplerConfig(**values)
    steps = run.config.diffusion.num_timesteps
    if sampler.steps is not None and sampler.steps > steps:
        raise InputError(f"--steps {sampler.steps} exceeds the model's {steps} diffusion steps; use 1 to {steps} "
                         "(0 = all).")
    return sampler


def open_prediction(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    sampler: SamplerConfig | Mapping[str, Any] | None = None,
    device: str = "auto",
    run: Run | None = None,
) -> tuple[Run, PreparedTiles, SamplerConfig, torch.device]:
    """Load and check what a prediction needs: the run, the split read through its normaliser, the sampler.

    Returns
    -------
    tuple
        ``(run, dataset, sampler, device)``.

    Raises
    ------
    InputError
        If the dataset's scale is not the model's, the steps exceed the model's, or the weights are not finite.
    """
    dev = resolve_device(device)
    run = run if run is not None else load_run(checkpoint, device=dev)
    trained = run.dataset
    dataset = PreparedTiles(data, split, normaliser=trained.normaliser if trained else None)
    if trained and trained.geometry.scale != dataset.geometry.scale:
        raise InputError(
            f"The model was trained at scale {trained.geometry.scale} but {data} is prepared at scale "
            f"{dataset.geometry.scale}; prepare the data with --scale {trained.geometry.scale}."
        )
    sampler = run_sampler(run, sampler)
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise InputError(f"The checkpoint {run.path} holds NaN or infinite weights; its training diverged or the "
                         "file is corrupt. Use an earlier checkpoint or train again.")
    return run, dataset, sampler, dev


def prediction_extras(run: Run, sampler: SamplerConfig, seed: int) -> dict[str, Any]:
    """Record how a prediction is made (see :func:`predict_checkpoint`'s ``extras``)."""
    used = sampler.model_copy(update={"point_estimate": point_estimate_kind(run, sampler)})
    extras = {"checkpoint": str(run.path), "step": run.step, "weights": run.weights, "sampler": used.model_dump(),
              "seed": seed}
    if run.config.train.objective != "regression":
        extras["intervals"] = {
            "levels": list(LEVELS), "layers": interval_layer_names(),
            "spread": used.interval_spread, "calibrated": used.interval_spread != 1.0,
            "method": "K sampled rates (spread around the point estimate scaled by sampler.interval_spread) "
                      "mixed with Poisson counting noise"}
    if run.base is not None:
        extras.update(base_checkpoint=str(run.base.path), base_step=run.base.step)
        if run.base.members:  # a seed ensemble: the other members' checkpoints
            extras["base_members"] = [str(m.path) for m in run.base.members]
    if run.members:
        extras["members"] = [str(m.path) for m in run.members]
    return extras


def interval_layer_names() -> list[str]:
    """Names of the interval layers a sampling prediction has, sorted (``q05``, ``q25``, ``q75``, ``q95``)."""
    probs = {round(p, 4) for lvl in LEVELS for p in ((1 - lvl) / 2, (1 + lvl) / 2)}
    return sorted(f"q{round(p * 100):02d}" for p in probs)


def predict_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    sampler: SamplerConfig | Mapping[str, Any] | None = None,
    batch_size: int = 4,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    run: Run | None = None,
    keep_samples: bool = True,
):
    """Load a trained run and predict every tile of a prepared split, results in memory.

    Parameters
    ----------
    checkpoint
        A checkpoint folder or a run folder (its latest checkpoint).
    data, split
        The prepared dataset and its split.
    sampler
        Sampler settings: None uses the run's own ``sampler:`` section, a mapping overrides some of its
        keys, a :class:`SamplerConfig` replaces it (see :func:`run_sampler`).
    batch_size, seed, device, progress, keep_samples
        See :func:`predict_tiles`; ``device`` may be ``auto``.
    run
        The run of ``checkpoint`` when already loaded (on ``device``).

    Returns
    -------
    tuple
        ``(dataset, predictions, extras)``; the dataset reads the tiles through the model's own normaliser
        and gene list, so outputs are in counts whatever dataset the model was trained on. ``extras``:
        ``checkpoint`` (path), ``step``, ``weights``, ``sampler`` (the settings used, ``point_estimate``
        resolved), ``seed`` and, for a two-stage run, ``base_checkpoint`` and ``base_step`` (its regression
        stage).
    """
    run, dataset, sampler, dev = open_prediction(checkpoint, data, split=split, sampler=sampler, device=device,
                                                 run=run)
    k = num_samples_of(run, sampler)
    geom = dataset.geometry
    check_sample_memory(len(dataset), len(dataset.genes), geom.tile_hr, k if keep_samples else 0)
    check_sample_memory(min(batch_size, len(dataset)), len(dataset.genes), geom.tile_hr, k)
    preds = predict_tiles(run, dataset, sampler, batch_size=batch_size, seed=seed, device=dev, progress=progress,
                          keep_samples=keep_samples)
    check_finite(preds, run.path)
    return dataset, preds, prediction_extras(run, sampler, seed)
