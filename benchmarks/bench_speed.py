"""Speed and memory of Diff-ST against the Guided-DM baseline at the paper geometry, on this machine.

Geometry: batch 1, 25 genes, LR 26 x 26, HR 256 x 256, RGB tile image 256 x 256, 256 cell patches of
16 x 16. Both models use the ``paper`` preset. Measured, with ``torch.no_grad`` and
``torch.set_num_threads(os.cpu_count())``:

Both models come from the packaged ``paper`` run preset (``src/diffst/presets/paper.yaml``).

* parameter count;
* forward latency: median over several runs after a warm-up; the two models alternate run by run in
  one process, so load from other processes on a shared machine hits both alike;
* peak memory: maximum resident set size (``getrusage``) of a fresh subprocess per model that builds
  the model and runs one forward pass (the RSS after importing torch is reported too);
* seconds per tile end to end with ``diffst.diffusion.samplers.sample`` (respaced ancestral DDPM): a
  few real sampling steps are timed and scaled to 20 steps (the authors' test-time setting) and 1000
  steps (the paper's setting). Without that module the figure is steps x forward latency.

Usage::

    python benchmarks/bench_speed.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ARCHS = ("diffst", "guided_dm")
LABELS = {"diffst": "Diff-ST", "guided_dm": "Guided-DM"}
N_GENES, LR_SIZE, HR_SIZE, IMAGE_SIZE, N_CELLS, PATCH = 25, 26, 256, 256, 256, 16
# Reference figures of the authors' released model on this CPU (DESIGN.md, section 2).
AUTHORS = {"params_m": 13.4, "forward_s": 4.4, "peak_gb": 0.8}


def paper_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with the paper's shapes."""
    gen = torch.Generator().manual_seed(seed)
    entropy = torch.rand(1, N_CELLS, generator=gen) * 6
    return dict(
        x_t=torch.randn(1, N_GENES, HR_SIZE, HR_SIZE, generator=gen),
        t=torch.tensor([500]),
        lr=torch.rand(1, N_GENES, LR_SIZE, LR_SIZE, generator=gen),
        tissue=torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
        cells=torch.rand(1, N_CELLS, 3, PATCH, PATCH, generator=gen),
        cell_entropy=entropy,
    )


def build(arch: str) -> torch.nn.Module:
    """The model of the ``paper`` run preset (with ``arch``), for N_GENES genes and an RGB image."""
    from diffst.config import parse_config, resolve_config
    from diffst.models import build_model

    cfg = parse_config({"preset": "paper", "data": {"path": "."}, "model": {"arch": arch}, "run_dir": "."}, "paper")
    torch.manual_seed(0)
    return build_model(resolve_config(cfg, N_GENES, 3).model_config_resolved()).eval()


def conditions(inputs: dict[str, torch.Tensor]):
    """The model's conditions of the random inputs (a :class:`~diffst.models.base.Conditions`)."""
    from diffst.models.base import Conditions

    return Conditions.from_batch(inputs)


def max_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def memory_worker(arch: str, threads: int) -> None:
    """Run in a fresh subprocess: build one model, run one forward, print its peak RSS as JSON."""
    torch.set_num_threads(threads)
    inputs = paper_inputs()
    rss_import = max_rss_mb()
    model = build(arch)
    with torch.no_grad():
        model(inputs["x_t"], inputs["t"], **conditions(inputs))
    print(json.dumps({"arch": arch, "rss_after_import_mb": rss_import, "peak_rss_mb": max_rss_mb()}))


def measure_memory(arch: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--memory-worker", arch, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_latency(models: dict[str, torch.nn.Module], inputs: dict, repeats: int) -> dict[str, list[float]]:
    """Forward times per model; models alternate (and swap order every round) after one warm-up each."""
    times: dict[str, list[float]] = {arch: [] for arch in models}
    cond = conditions(inputs)
    with torch.no_grad():
        for model in models.values():
            model(inputs["x_t"], inputs["t"], **cond)
        order = list(models)
        for _ in range(repeats):
            for arch in order:
                start = time.perf_counter()
                models[arch](inputs["x_t"], inputs["t"], **cond)
                times[arch].append(time.perf_counter() - start)
            order.reverse()
    return times


def measure_sampling(model: torch.nn.Module, inputs: dict, steps: int) -> float | None:
    """Wall time of ``steps`` respaced DDPM steps with the project's sampler, or None if it is missing."""
    try:
        from diffst.diffusion.process import GaussianDiffusion
        from diffst.diffusion.samplers import sample
    except ImportError:
        return None
    cond = conditions(inputs)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, **cond).prediction

    noise = torch.randn_like(inputs["x_t"])
    start = time.perf_counter()
    with torch.no_grad():
        sample(model_fn, noise, GaussianDiffusion(), "ddpm", steps, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [LABELS[a] for a in ARCHS] + ["authors' Diff-ST\n(DESIGN.md, other run)"]
    panels = [
        ("parameters (M)", [results[a]["params_m"] for a in ARCHS] + [AUTHORS["params_m"]]),
        ("forward, median (s)", [results[a]["forward_median_s"] for a in ARCHS] + [AUTHORS["forward_s"]]),
        ("peak RSS (GB)", [results[a]["peak_rss_mb"] / 1024 for a in ARCHS] + [AUTHORS["peak_gb"]]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=["#1f77b4", "#ff7f0e", "#999999"])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"batch 1, HR {HR_SIZE}², LR {LR_SIZE}², {N_GENES} genes, {results['threads']} CPU threads, no_grad; "
        f"1-min load average {results['load']:.1f}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sampling steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: os.cpu_count())"
    )
    parser.add_argument("--memory-worker", choices=ARCHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads
    if args.memory_worker:
        memory_worker(args.memory_worker, threads)
        return

    torch.set_num_threads(threads)
    repeats = 2 if args.quick else 5
    sample_steps = 2 if args.quick else 3
    args.out.mkdir(parents=True, exist_ok=True)

    memory = {arch: measure_memory(arch, threads) for arch in ARCHS}
    inputs = paper_inputs()
    models = {arch: build(arch) for arch in ARCHS}
    times = measure_latency(models, inputs, repeats)

    results: dict = {}
    for arch in ARCHS:
        median = statistics.median(times[arch])
        sampled = measure_sampling(models[arch], inputs, sample_steps)
        per_step = sampled / sample_steps if sampled is not None else median
        results[arch] = {
            "params": sum(p.numel() for p in models[arch].parameters()),
            "params_m": sum(p.numel() for p in models[arch].parameters()) / 1e6,
            "forward_times_s": times[arch],
            "forward_median_s": median,
            "peak_rss_mb": memory[arch]["peak_rss_mb"],
            "rss_after_import_mb": memory[arch]["rss_after_import_mb"],
            "sampling_source": (
                f"measured: {sample_steps} respaced DDPM steps with diffusion.samplers.sample, scaled"
                if sampled is not None
                else "estimated: steps x forward median (diffst.diffusion.samplers not available)"
            ),
            "seconds_per_step": per_step,
            "seconds_per_tile_20_steps": 20 * per_step,
            "seconds_per_tile_1000_steps": 1000 * per_step,
            # The same from the interleaved forward median alone (less exposed to load changes).
            "seconds_per_tile_20_steps_from_forward": 20 * median,
        }
    for arch in ARCHS:
        results[arch]["forward_min_s"] = min(times[arch])
    # Runs alternate, so pair them: a load spike from another process then hits one pair, not one model.
    paired = [a / b for a, b in zip(times["diffst"], times["guided_dm"], strict=True)]
    ratio = statistics.median(paired)
    ratio_of_medians = results["diffst"]["forward_median_s"] / results["guided_dm"]["forward_median_s"]
    ratio_of_mins = results["diffst"]["forward_min_s"] / results["guided_dm"]["forward_min_s"]
    summary = {
        "geometry": dict(batch=1, n_genes=N_GENES, lr=LR_SIZE, hr=HR_SIZE, image=IMAGE_SIZE, cells=N_CELLS, patch=PATCH),
        "threads": threads,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "load_average_1min": os.getloadavg()[0],
        "quick": args.quick,
        "repeats": repeats,
        "models": results,
        "diffst_over_guided_dm_forward": ratio,
        "forward_ratio_definition": "median over rounds of (Diff-ST time / Guided-DM time) in the same round",
        "forward_ratio_of_medians": ratio_of_medians,
        "forward_ratio_of_mins": ratio_of_mins,
        "target_ratio_max": 1.5,
        "authors_reference": AUTHORS,
    }

    header = (
        f"{'model':<10} {'params (M)':>10} {'fwd median (s)':>15} {'fwd min (s)':>12} {'peak RSS (MB)':>14}"
        f" {'s/tile @20':>11} {'s/tile @1000':>13}"
    )
    print(header)
    print("-" * len(header))
    for arch in ARCHS:
        r = results[arch]
        print(
            f"{LABELS[arch]:<10} {r['params_m']:>10.2f} {r['forward_median_s']:>15.2f} {r['forward_min_s']:>12.2f}"
            f" {r['peak_rss_mb']:>14.0f}"
            f" {r['seconds_per_tile_20_steps']:>11.1f} {r['seconds_per_tile_1000_steps']:>13.0f}"
        )
    print(
        f"{'authors':<10} {AUTHORS['params_m']:>10.2f} {AUTHORS['forward_s']:>15.2f} {'':>12}"
        f" {AUTHORS['peak_gb'] * 1024:>14.0f}"
    )
    print(
        f"Diff-ST / Guided-DM forward: {ratio:.2f}x median of paired runs (target <= 1.5x); "
        f"ratio of medians {ratio_of_medians:.2f}x, of minima {ratio_of_mins:.2f}x"
    )
    print(f"seconds per tile: {results['diffst']['sampling_source']}")
    print(
        f"1-min load average during the run: {summary['load_average_1min']:.2f} "
        f"({os.cpu_count()} cores, {threads} torch threads); other processes inflate absolute times"
    )

    (args.out / "bench_speed.json").write_text(json.dumps(summary, indent=2))
    plot({**results, "threads": threads, "load": summary["load_average_1min"]}, args.out / "bench_speed.png")
    print(f"saved {args.out / 'bench_speed.json'} and {args.out / 'bench_speed.png'}")


if __name__ == "__main__":
    main()
