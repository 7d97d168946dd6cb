"""Speed of Diff-ST at the paper geometry on this machine: forward, seconds per tile, training, memory, throughput.

One process (the peak-memory probe excepted), ``--threads`` torch threads (default: every core), the device
chosen at run time (CUDA when there is one, else the CPU). The network runs in the precision inference uses
(:func:`~diffst.diffusion.samplers.sampling_autocast`: autocast on CUDA and on CPUs with native bf16, else
float32). Without CUDA the report says so and gives no GPU figure. Figures, written to
``benchmarks/results/bench_speed.json`` (with the torch version, threads, load average before and after, date,
machine and command) and drawn in ``bench_speed.png``:

* ``forward_s``: median latency of one Diff-ST forward (``paper`` preset, random weights) at the paper
  geometry (batch 1, 25 genes, LR 26 x 26, HR 256 x 256, RGB image 256 x 256, 256 cell patches of 16 x 16),
  and ``forward_ratio_vs_guided``: the median over rounds of Diff-ST / Guided-DM backbone time, the two models
  alternating run by run (and swapping order every round), so load from other processes hits both alike;
* ``point_s_per_tile``: seconds per tile of the point estimate, end to end through the package's inference
  (:func:`diffst.inference.predict.predict_tiles` on a prepared dataset, the stage-one seed ensemble of the
  two-stage recipe: tile reading, one network call per member and view (``network_calls_per_point``: 4 seeds x
  ``sampler.point_views``), counts, spot projection);
* ``k4_s_per_tile``: the same for K = 4 samples with the run's default sampler (the two-stage run: stage one's
  call, then the sampler over stage two's network);
* ``train_steps_per_s``: optimiser steps of stage two's diffusion objective per second, batch 1;
* ``peak_rss_mb``: peak resident memory of a fresh process that predicts K = 4 samples of one tile;
* ``throughput_mm2_per_min``: tissue area per minute of the point estimate over a large slide, each tile
  adding the new area of its stride (the half-tile overlap that prepared evaluation tiles have).

The end-to-end figures use the package's own ``paper`` tile geometry (2.6 mm: LR 26 x 26 bins of 100 um, HR
260 x 260 bins of 10 um), prepared from a synthetic slide (:mod:`diffst.testing.synthetic`): the weights are
random, so only the time means anything. With ``--levers`` the script also measures, per sampler step and
paired, what each speed lever buys (encoding the conditions once per tile, batching the K samples,
channels-last, bf16 autocast on the CPU, torch.compile with ``--compile``, guided-diffusion's 88 M layout
against the ``paper`` preset's). ``--quick`` is a smoke run (fewer repetitions, two sampler steps scaled to the
default count). ``--step-quality`` instead measures what fewer sampler steps do to the two-stage recipe's
answer, sample mean and interval coverage on held-out tiles of trained runs (:func:`measure_step_quality`).

Usage::

    python benchmarks/bench_speed.py [--quick] [--levers [--compile]] [--threads N] [--device auto|cpu|cuda]
    python benchmarks/bench_speed.py --step-quality demo_output [--scale 10]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

N_GENES, LR_SIZE, HR_SIZE, IMAGE_SIZE, N_CELLS, PATCH = 25, 26, 256, 256, 256, 16
K_SAMPLES = 4
# Reference: the authors' released model timed on this CPU (2 threads) beside our models, 2026-11-25
# (issue 10; their script is not part of the package): 13.4 M parameters, 3.55 s per forward, ~71 s per
# tile at their 20-step default.
AUTHORS = {"params_m": 13.4, "forward_s": 3.55, "s_per_tile_20_steps": 71.0, "measured": "2026-11-25, issue 10"}


# -- inputs, models, precision --------------------------------------------------------------------------


def paper_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with the paper's shapes (batch 1)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(1, N_GENES, HR_SIZE, HR_SIZE, generator=gen),
        t=torch.tensor([500]),
        lr=torch.rand(1, N_GENES, LR_SIZE, LR_SIZE, generator=gen),
        tissue=torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
        cells=torch.rand(1, N_CELLS, 3, PATCH, PATCH, generator=gen),
        cell_entropy=torch.rand(1, N_CELLS, generator=gen) * 6,
    )


def conditions(inputs: dict[str, torch.Tensor], device: torch.device):
    """The model's :class:`~diffst.models.base.Conditions` of the random inputs, on ``device``."""
    from diffst.models.base import Conditions

    return Conditions.from_batch(inputs).to(device)


def build(arch: str, device: torch.device, **overrides) -> torch.nn.Module:
    """The model of the ``paper`` run preset (with ``arch`` and any model overrides), for 25 genes and RGB."""
    from diffst.config import parse_config, resolve_config
    from diffst.models import build_model

    model = {"arch": arch, **overrides}
    cfg = parse_config({"preset": "paper", "data": {"path": "."}, "model": model, "run_dir": "."}, "paper")
    torch.manual_seed(0)
    return build_model(resolve_config(cfg, N_GENES, 3).model_config_resolved()).to(device).eval()


def randomise_zero_layers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised weights small random values, so that outputs (and precision errors) are not zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def network_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """The precision inference runs the network in (:func:`~diffst.diffusion.samplers.sampling_autocast`)."""
    from diffst.diffusion.samplers import sampling_autocast

    return sampling_autocast(device)


def training_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Training: mixed precision on CUDA (as ``train.mixed_precision`` would give), float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def describe_precision(device: torch.device) -> str:
    """Name the precision of the network calls of inference on ``device``."""
    context = network_precision(device)
    if isinstance(context, torch.autocast):
        return f"autocast {context.fast_dtype} (sampler network calls and the forward timings); stage one float32"
    return "float32"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_times(calls: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Wall times of each call, after one warm-up each; calls alternate and swap order every round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name in order:
                synchronize(device)
                start = time.perf_counter()
                calls[name]()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
            order.reverse()
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of numerator time / denominator time in the same round."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))


# -- forward latency ------------------------------------------------------------------------------------


def measure_forward(device: torch.device, repeats: int) -> dict:
    """Diff-ST forward, its per-step forward with encoded conditions, and the Guided-DM backbone, alternating."""
    from diffst.models.base import bind_conditions

    inputs = {k: v.to(device) for k, v in paper_inputs().items()}
    cond = conditions(inputs, device)
    diffst, guided = build("diffst", device), build("guided_dm", device)
    x_t, t = inputs["x_t"], inputs["t"]
    with torch.no_grad():
        step = bind_conditions(diffst, cond, (HR_SIZE, HR_SIZE))

    def under_precision(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            with network_precision(device):
                return fn()
        return call

    times = paired_times({
        "diffst": under_precision(lambda: diffst(x_t, t, **cond)),
        "guided_dm": under_precision(lambda: guided(x_t, t, **cond)),
        "diffst_step": under_precision(lambda: step(x_t, t)),
    }, repeats, device)
    return {
        "params_m": {name: sum(p.numel() for p in m.parameters()) / 1e6
                     for name, m in (("diffst", diffst), ("guided_dm", guided))},
        "times_s": times,
        "median_s": {name: statistics.median(v) for name, v in times.items()},
        "ratio_vs_guided": paired_ratio(times, "diffst", "guided_dm"),
        "step_ratio_vs_guided": paired_ratio(times, "diffst_step", "guided_dm"),
    }


# -- end to end: prepared tiles, runs, predict_tiles ----------------------------------------------------


def prepare_paper_tile(folder: Path) -> Path:
    """A prepared dataset of one ``paper``-geometry tile (s = 10) cut from a synthetic slide of 25 genes."""
    from diffst.core.geometry import tile_preset
    from diffst.data.prepare import is_prepared_dataset, prepare_dataset
    from diffst.testing.synthetic import synthetic_slide

    if is_prepared_dataset(folder):
        return folder
    geom = tile_preset("paper", 10)
    slide = synthetic_slide(geom.tile_um, geom.tile_um, n_genes=N_GENES, seed=0)
    return prepare_dataset([slide], folder, geom, n_genes=N_GENES, overwrite=True, progress=False, preview=False)


def two_stage_runs(data: Path, device: torch.device):
    """The two runs of Diff-ST's recipe on the ``paper`` preset, with random weights: (stage one, stage two).

    Stage one is the spot-ratio regression (its prediction is the point estimate), stage two the diffusion of
    the residual over it; both are :class:`~diffst.runs.Run` objects as :func:`~diffst.runs.load_run` gives.
    """
    from diffst.config import parse_config, resolve_config
    from diffst.data.dataset import PreparedTiles
    from diffst.runs import DatasetSpec, Run, build_run_model
    from diffst.training.recipe import STAGE_ONE_MEMBERS, stage_one_config, stage_two_config

    spec = DatasetSpec.from_tiles(PreparedTiles(data, "train"))
    base = {"preset": "paper", "data": {"path": str(data)}, "run_dir": str(data.parent / "run")}

    def run(config: dict, parent: Run | None) -> Run:
        cfg = resolve_config(parse_config(config, "bench"), len(spec.genes), spec.image_channels)
        torch.manual_seed(cfg.seed)
        model = build_run_model(cfg).to(device).eval()
        return Run(model=model, config=cfg, dataset=spec, coexpression=None, entropy_threshold=None, step=0,
                   path=Path(cfg.run_dir), base=parent)

    # Stage one is a seed ensemble (random weights, one seed per member), as the recipe trains it.
    members = [run(stage_one_config(base, steps=None, member=k), None) for k in range(STAGE_ONE_MEMBERS)]
    stage_one = members[0]
    stage_one.members = tuple(members[1:])
    return stage_one, run(stage_two_config(base, [m.path for m in members]), stage_one)


def time_predict(run, data: Path, sampler, device: torch.device, repeats: int) -> list[float]:
    """Wall times of ``predict_tiles`` over the dataset's one tile, after a warm-up call of one sampler step."""
    from diffst.data.dataset import PreparedTiles
    from diffst.inference.predict import predict_tiles

    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        dataset = PreparedTiles(data, "train", normaliser=run.dataset.normaliser)  # opening the data is part of it
        # The warm-up builds the kernels for these shapes; one step does that as well as twenty.
        settings = sampler if i else sampler.model_copy(update={"steps": 1})
        predict_tiles(run, dataset, settings, batch_size=1, seed=i, device=device, progress=False)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return times


def measure_end_to_end(data: Path, device: torch.device, repeats: int, quick: bool) -> dict:
    """Seconds per tile of the point estimate and of K = 4 samples, through ``predict_tiles``."""
    from diffst.inference.predict import run_sampler

    stage_one, stage_two = two_stage_runs(data, device)
    default = run_sampler(stage_two)
    point = time_predict(stage_one, data, run_sampler(stage_one), device, repeats)
    steps = default.steps or stage_two.config.diffusion.num_timesteps
    timed_steps = min(2, steps) if quick else steps
    sampler = run_sampler(stage_two, {"num_samples": K_SAMPLES, "steps": timed_steps})
    k4 = time_predict(stage_two, data, sampler, device, 1 if quick else max(1, repeats // 2))
    k4_median = statistics.median(k4)
    if timed_steps != steps:
        # Quick mode: stage one's call and the overheads once, the sampler steps scaled to the default count.
        k4_median = statistics.median(point) + (k4_median - statistics.median(point)) * steps / timed_steps
    return {
        "point_times_s": point,
        "point_s_per_tile": statistics.median(point),
        "k4_times_s": k4,
        "k4_s_per_tile": k4_median,
        "default_sampler": default.model_dump(),
        "network_calls_per_point": len(stage_one.models) * run_sampler(stage_one).point_views,
        "k4_sampler_steps_timed": timed_steps,
        "params_m": {"stage_one": sum(p.numel() for p in stage_one.model.parameters()) / 1e6,
                     "stage_two": sum(p.numel() for p in stage_two.model.parameters()) / 1e6},
    }


def measure_training(data: Path, device: torch.device, steps: int) -> dict:
    """Optimiser steps per second of stage two's diffusion objective (batch 1, AdamW, gradient clipping)."""
    from diffst.data.dataset import PreparedTiles
    from diffst.training.frozen_base import FrozenBase
    from diffst.training.objectives import make_objective

    _, stage_two = two_stage_runs(data, device)
    model = stage_two.model.train()
    # As the trainer does: the base's answer computed once per tile (the first, untimed step), then looked up.
    base = FrozenBase(stage_two.base, data, "train", stage_two.config.sampler.point_views)
    objective = make_objective(stage_two.config, base, stage_two.dataset)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.utils.data.default_collate([PreparedTiles(data, "train")[0]])
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        with training_precision(device):
            loss, _ = objective(model, batch, None, generator, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        synchronize(device)
        if i:  # the first step builds the optimiser state
            times.append(time.perf_counter() - start)
    return {"step_times_s": times, "train_steps_per_s": 1.0 / statistics.median(times), "batch_size": 1}


# -- memory (fresh process) -----------------------------------------------------------------------------


def max_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    On Linux the high-water mark of this program's memory (``VmHWM``): ``getrusage``'s ``ru_maxrss`` would
    carry over the parent's peak through fork and exec. Elsewhere ``ru_maxrss`` (macOS reports bytes).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def memory_worker(data: Path, device: torch.device) -> None:
    """In a fresh process: predict K = 4 samples of the tile (one sampler step: memory does not grow with
    steps) and print the peak RSS as JSON."""
    from diffst.data.dataset import PreparedTiles
    from diffst.inference.predict import predict_tiles, run_sampler

    rss_import = max_rss_mb()
    _, stage_two = two_stage_runs(data, device)
    sampler = run_sampler(stage_two, {"num_samples": K_SAMPLES, "steps": 1})
    predict_tiles(stage_two, PreparedTiles(data, "train", normaliser=stage_two.dataset.normaliser), sampler,
                  batch_size=1, device=device, progress=False)
    print(json.dumps({"rss_after_import_mb": rss_import, "peak_rss_mb": max_rss_mb()}))


def measure_memory(data: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--memory-worker", str(data), "--threads", str(args.threads),
               "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- levers (per sampler step, paired) ------------------------------------------------------------------


def measure_levers(device: torch.device, repeats: int, with_compile: bool) -> dict:
    """Paired ratios (new / old, median over alternating rounds) of each speed lever, fp32 unless named."""
    from diffst.models.base import bind_conditions

    inputs = {k: v.to(device) for k, v in paper_inputs().items()}
    cond = conditions(inputs, device)
    x_t, t = inputs["x_t"], inputs["t"]
    model = randomise_zero_layers(build("diffst", device))
    levers: dict[str, dict] = {}

    def record(name: str, calls: dict[str, Callable[[], object]], note: str, reps: int = repeats) -> None:
        times = paired_times(calls, reps, device)
        old, new = list(calls)
        levers[name] = {"ratio_new_over_old": paired_ratio(times, new, old), "old": old, "new": new,
                        "median_s": {k: statistics.median(v) for k, v in times.items()}, "note": note}
        print(f"  lever {name}: {new} / {old} = {levers[name]['ratio_new_over_old']:.2f}", flush=True)

    with torch.no_grad():
        step = bind_conditions(model, cond, (HR_SIZE, HR_SIZE))
    record("encode_once", {"forward": lambda: model(x_t, t, **cond), "encoded": lambda: step(x_t, t)},
           "a sampler step: full forward vs forward_encoded with the conditions encoded once per tile")
    x_k, t_k = x_t.repeat(K_SAMPLES, 1, 1, 1), t.repeat(K_SAMPLES)
    record("batch_k4", {"4_calls": lambda: [step(x_t, t) for _ in range(K_SAMPLES)],
                        "1_call_of_4": lambda: step(x_k, t_k)},
           "one sampler step of K = 4 samples: 4 calls of batch 1 vs one call of batch 4", max(2, repeats // 2))
    if device.type == "cpu":
        def bf16_step() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return step(x_k, t_k)
        record("cpu_bf16", {"fp32": lambda: step(x_k, t_k), "bf16": bf16_step},
               "a sampler step of K = 4 samples (one call of batch 4) under bf16 autocast")
        with torch.no_grad():
            exact, rounded = step(x_k, t_k).prediction, bf16_step().prediction.float()
        levers["cpu_bf16"]["relative_rms_error"] = float((rounded - exact).pow(2).mean().sqrt()
                                                         / exact.pow(2).mean().sqrt())
    nhwc = randomise_zero_layers(build("diffst", device)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        step_nhwc = bind_conditions(nhwc, cond, (HR_SIZE, HR_SIZE))
    x_nhwc = x_t.contiguous(memory_format=torch.channels_last)
    record("channels_last", {"nchw": lambda: step(x_t, t), "nhwc": lambda: step_nhwc(x_nhwc, t)},
           "a sampler step, weights and input in channels-last")
    big = build("diffst", device, base_channels=128, channel_mult=[1, 1, 2, 2, 4, 4])
    with torch.no_grad():
        step_big = bind_conditions(big, cond, (HR_SIZE, HR_SIZE))
    record("paper_layout", {"gd_256px_88M": lambda: step_big(x_t, t), "paper_14M": lambda: step(x_t, t)},
           "a sampler step: guided-diffusion's 256 px layout (128 ch x (1,1,2,2,4,4)) vs the paper preset's",
           max(2, repeats // 2))
    if with_compile:
        compiled = torch.compile(model.forward_encoded)
        encoded = model.encode_conditions((HR_SIZE, HR_SIZE), **cond)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(x_t, t, encoded)
        compile_s = time.perf_counter() - start
        record("torch_compile", {"eager": lambda: model.forward_encoded(x_t, t, encoded),
                                 "compiled": lambda: compiled(x_t, t, encoded)},
               "a sampler step, torch.compile (default mode) of forward_encoded")
        levers["torch_compile"]["compile_s"] = compile_s
    return levers


# -- quality against sampler steps (two-stage runs of the built-in example) -----------------------------


SAMPLER_SETTINGS = (("ddpm", 20), ("ddpm", 10), ("ddim", 10), ("dpmpp", 10), ("dpmpp", 20))


def measure_step_quality(bench: Path, scale: int, k: int = K_SAMPLES, seed: int = 0) -> dict:
    """What fewer sampler steps do to the two-stage recipe on held-out tiles of ``diffst benchmark`` folds.

    ``bench`` is a finished ``diffst demo`` folder (its two-stage run ``run_s<scale>`` and data
    ``prepared_s<scale>``) or ``diffst benchmark --example --methods ...,diffst`` folder (every fold's
    ``diffst-full-seed0`` run). Each two-stage run predicts its test tiles with K samples per setting of
    :data:`SAMPLER_SETTINGS`. The
    answer (stage one's) does not depend on the sampler; the samples give the spread. Reported per setting,
    pooled over folds: PCC of the answer and of the samples' mean (per tile and gene, averaged), and the
    coverage of held-out observed counts by the raw 50 % and 90 % intervals, with bootstrap intervals over
    tiles.
    """
    import numpy as np

    from diffst.data.dataset import PreparedTiles
    from diffst.evaluation.metrics import bootstrap_interval
    from diffst.inference.intervals import coverage, interval_bounds
    from diffst.inference.predict import predict_checkpoint

    def pcc_per_tile(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        values = []
        for tile_pred, tile_truth in zip(pred, truth, strict=True):
            per_gene = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(tile_pred, tile_truth, strict=True)
                        if a.std() > 0 and b.std() > 0]
            values.append(np.mean(per_gene) if per_gene else np.nan)
        return np.asarray(values)

    if (bench / f"run_s{scale}").is_dir():
        pairs = [(bench / f"run_s{scale}", bench / f"prepared_s{scale}")]
    else:
        pairs = [(fold / "diffst-full-seed0", bench / "prepared" / f"s{scale}" / fold.name)
                 for fold in sorted((bench / "runs" / f"s{scale}").iterdir())]
    results: dict[str, dict] = {}
    for method, steps in SAMPLER_SETTINGS:
        answer, sample_mean, cov50, cov90, seconds = [], [], [], [], 0.0
        for run, data in pairs:
            truth = np.asarray(PreparedTiles(data, "test").hr_counts, dtype=np.float32)
            start = time.perf_counter()
            test, preds, _ = predict_checkpoint(run, data, split="test", device="cpu",
                                                sampler={"method": method, "steps": steps, "num_samples": k},
                                                seed=seed, progress=False)
            seconds += time.perf_counter() - start
            drawn = np.asarray(test.normaliser.to_counts(preds.samples_model), dtype=np.float32)
            answer.append(pcc_per_tile(preds.mean, truth))
            sample_mean.append(pcc_per_tile(drawn.mean(axis=0), truth))
            bounds = interval_bounds(drawn, preds.mean)
            for tile in range(len(truth)):
                cov50.append(coverage(bounds["q25"][tile], bounds["q75"][tile], truth[tile]))
                cov90.append(coverage(bounds["q05"][tile], bounds["q95"][tile], truth[tile]))
        row = {}
        for name, values in (("answer_pcc", np.concatenate(answer)), ("sample_mean_pcc", np.concatenate(sample_mean)),
                             ("coverage_50", np.asarray(cov50)), ("coverage_90", np.asarray(cov90))):
            values = values[np.isfinite(values)]
            row[name] = float(values.mean())
            row[name + "_ci"] = list(bootstrap_interval(values, seed=seed))
        row["n_tiles"] = len(cov90)
        row["predict_s"] = seconds
        results[f"{method}-{steps}"] = row
        print(f"  {method:>5} {steps:>3} steps: answer PCC {row['answer_pcc']:.3f}, sample-mean PCC "
              f"{row['sample_mean_pcc']:.3f} {row['sample_mean_pcc_ci']}, coverage 50 % {row['coverage_50']:.3f}, "
              f"90 % {row['coverage_90']:.3f} {row['coverage_90_ci']}", flush=True)
    return {"bench": str(bench), "runs": [str(run) for run, _ in pairs], "scale": scale, "k": k, "settings": results}


# -- report ---------------------------------------------------------------------------------------------


def plot(summary: dict, path: Path) -> None:
    """Three panels: forward latency of both models, seconds per tile against the targets, lever ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    details = summary["details"]
    medians = details["forward"]["median_s"]
    levers = details.get("levers") or {}
    fig, axes = plt.subplots(1, 3 if levers else 2, figsize=(12 if levers else 8, 3.4))
    bars = axes[0].bar(["Diff-ST", "Diff-ST step\n(encoded)", "Guided-DM"],
                       [medians["diffst"], medians["diffst_step"], medians["guided_dm"]],
                       color=["#1f77b4", "#6baed6", "#ff7f0e"])
    axes[0].bar_label(bars, fmt="%.2f", fontsize=8)
    axes[0].set_title(f"forward, median (s); ratio {summary['forward_ratio_vs_guided']:.2f}", fontsize=10)
    names = ["point estimate", f"K = {K_SAMPLES} samples"]
    values = [summary["point_s_per_tile"], summary["k4_s_per_tile"]]
    targets = [details["targets"]["point_s_per_tile_max"], details["targets"]["k4_s_per_tile_max"]]
    bars = axes[1].bar(names, values, color=["#2ca02c", "#9467bd"])
    axes[1].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[1].scatter(names, targets, marker="_", s=900, color="k", label="target")
    axes[1].legend(fontsize=8)
    axes[1].set_title("seconds per 2.6 mm tile, end to end", fontsize=10)
    if levers:
        names = list(levers)
        bars = axes[2].barh(names, [levers[n]["ratio_new_over_old"] for n in names], color="#7f7f7f")
        axes[2].bar_label(bars, fmt="%.2f", fontsize=8)
        axes[2].axvline(1.0, color="k", lw=0.8)
        axes[2].set_title("lever: time with / without (paired)", fontsize=10)
        axes[2].tick_params(axis="y", labelsize=8)
    fig.suptitle(f"{summary['device']}, {summary['threads']} threads, {summary['precision'].split(' (')[0]}; "
                 f"load {summary['load_before'][0]:.1f} -> {summary['load_after'][0]:.1f}; {summary['date'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def dataset_folder(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="diffst_bench_speed_") as tmp:
        yield Path(tmp) / "prepared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions, 2 sampler steps scaled")
    parser.add_argument("--levers", action="store_true", help="also measure each speed lever, paired")
    parser.add_argument("--compile", action="store_true", help="with --levers: also time torch.compile")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--data", type=Path, default=None, help="keep the prepared paper tile here (reused)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--step-quality", type=Path, default=None, metavar="BENCH",
                        help="instead: quality against sampler steps on a finished `diffst benchmark --example` folder")
    parser.add_argument("--scale", type=int, default=10, help="with --step-quality: the scale")
    parser.add_argument("--memory-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.step_quality:
        result = measure_step_quality(args.step_quality, args.scale)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"bench_speed_steps_s{args.scale}.json").write_text(json.dumps(result, indent=2))
        return
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if args.device == "auto" and cuda else "cpu" if args.device == "auto" else args.device)
    if args.memory_worker:
        memory_worker(args.memory_worker, device)
        return

    repeats = 2 if args.quick else 5
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    precision = describe_precision(device)
    print(f"device {device} (CUDA available: {cuda}), {args.threads} threads, network precision: {precision}, "
          f"load {load_before[0]:.2f}", flush=True)
    forward = measure_forward(device, repeats)
    print(f"forward: Diff-ST {forward['median_s']['diffst']:.2f} s, Guided-DM {forward['median_s']['guided_dm']:.2f} s,"
          f" paired ratio {forward['ratio_vs_guided']:.2f}; per step {forward['median_s']['diffst_step']:.2f} s",
          flush=True)
    with dataset_folder(args.data) as folder:
        data = prepare_paper_tile(folder)
        e2e = measure_end_to_end(data, device, 3 if not args.quick else 1, args.quick)
        print(f"point estimate {e2e['point_s_per_tile']:.2f} s/tile, K = 4 samples {e2e['k4_s_per_tile']:.1f} s/tile",
              flush=True)
        training = measure_training(data, device, 2 if args.quick else 4)
        print(f"training {training['train_steps_per_s']:.3f} steps/s", flush=True)
        memory = measure_memory(data, args)
        print(f"peak RSS {memory['peak_rss_mb']:.0f} MB", flush=True)
        from diffst.core.geometry import tile_preset
        from diffst.data.prepare import SplitSpec

        geom = tile_preset("paper", 10)
        stride_um = SplitSpec().eval_stride_um or geom.tile_um / 2
    levers = measure_levers(device, repeats, args.compile) if args.levers else None
    new_area_mm2 = (stride_um / 1000) ** 2

    def mm2_per_min(seconds: float) -> float:
        return new_area_mm2 / seconds * 60

    load_after = os.getloadavg()
    summary = {
        "forward_s": forward["median_s"]["diffst"],
        "forward_ratio_vs_guided": forward["ratio_vs_guided"],
        "point_s_per_tile": e2e["point_s_per_tile"],
        "k4_s_per_tile": e2e["k4_s_per_tile"],
        "train_steps_per_s": training["train_steps_per_s"],
        "peak_rss_mb": memory["peak_rss_mb"],
        "throughput_mm2_per_min": mm2_per_min(e2e["point_s_per_tile"]),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "date": started.isoformat(timespec="seconds"),
        "cuda_available": cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if cuda else "none: no CUDA device here, no GPU figures",
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_speed.py", *sys.argv[1:]]),
        "quick": args.quick,
        "precision": precision,
        "details": {
            "geometry_forward": dict(batch=1, n_genes=N_GENES, lr=LR_SIZE, hr=HR_SIZE, image=IMAGE_SIZE,
                                     cells=N_CELLS, patch=PATCH),
            "geometry_end_to_end": geom.describe(),
            "forward": forward,
            "end_to_end": e2e,
            "training": training,
            "memory": memory,
            "throughput": {"tile_um": geom.tile_um, "stride_um": stride_um, "new_mm2_per_tile": new_area_mm2,
                           "point_mm2_per_min": mm2_per_min(e2e["point_s_per_tile"]),
                           "k4_mm2_per_min": mm2_per_min(e2e["k4_s_per_tile"])},
            "targets": {"point_s_per_tile_max": 12.0, "k4_s_per_tile_max": 60.0, "forward_ratio_max": 1.5},
            "authors_reference": AUTHORS,
            "levers": levers,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_speed.json"
    path.write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / "bench_speed.png")
    for key in ("forward_s", "forward_ratio_vs_guided", "point_s_per_tile", "k4_s_per_tile", "train_steps_per_s",
                "peak_rss_mb", "throughput_mm2_per_min"):
        print(f"{key:>24}: {summary[key]:.3f}")
    print(f"load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} ({os.cpu_count()} CPUs); "
          f"saved {path} and bench_speed.png")


if __name__ == "__main__":
    main()
