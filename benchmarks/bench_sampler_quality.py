"""Quality versus sampling steps on the real Xenium crop, region held out, at 5x and 10x.

For each scale: prepare the built-in example (cpu tiles, right-most 200 µm held out), train the ``cpu``
run preset (``src/diffst/presets/cpu.yaml``; or reuse a finished run), then sample the held-out tiles with DDPM 1000 (the paper), respaced
DDPM 250/50/20, DDIM 50/20/10 and DPM-Solver++ 20/10, all from the same seeds, and report signed
PCC and RMSE (counts) of the K-sample mean and of single samples, with wall time per tile, beside
bicubic interpolation of LR and the split-half noise ceiling. Writes JSON, a Markdown table and a
PNG per scale to --out.

    python benchmarks/bench_sampler_quality.py                 # full run (~25 min on 2 cores)
    python benchmarks/bench_sampler_quality.py --quick         # smoke run: few steps, 3 samplers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffst.config import parse_config
from diffst.demo import prepare_example_data
from diffst.diffusion.config import SamplerConfig
from diffst.evaluation.ceiling import split_half_ceiling
from diffst.evaluation.metrics import evaluate_maps
from diffst.evaluation.report import evaluate_split
from diffst.example import load_example
from diffst.inference.predict import predict_tiles
from diffst.plotting.compare import plot_metric_vs_steps
from diffst.runs import latest_checkpoint, load_run, read_training_state
from diffst.training import train

SAMPLERS = [("ddpm", 1000), ("ddpm", 250), ("ddpm", 50), ("ddpm", 20), ("ddim", 50), ("ddim", 20), ("ddim", 10),
            ("dpmpp", 20), ("dpmpp", 10)]
QUICK = [("ddpm", 20), ("ddim", 10), ("dpmpp", 10)]


def trained_run(out: Path, scale: int, steps: int, seed: int) -> Path:
    """Prepare and train once (the ``cpu`` run preset at ``scale``); a finished run in ``out`` is reused."""
    run_dir = out / f"run_s{scale}"
    cfg = parse_config({
        "preset": "cpu", "seed": seed, "device": "cpu", "run_dir": str(run_dir),
        "data": {"path": str(out / f"prepared_s{scale}"), "example": {"scale": scale}},
        "train": {"steps": steps, "checkpoint_every": max(steps // 4, 1), "keep_last": 2},
    }, "benchmark")
    latest = latest_checkpoint(run_dir)
    if latest is not None and read_training_state(latest)["state"]["step"] >= steps:
        return run_dir
    prepare_example_data(cfg)
    train(cfg, resume=latest is not None)
    return run_dir


def bench_scale(out: Path, scale: int, steps: int, samplers, k: int, seed: int) -> dict:
    from diffst.data.dataset import PreparedTiles

    run = load_run(trained_run(out, scale, steps, seed), device="cpu")
    dataset = PreparedTiles(out / f"prepared_s{scale}", "test", normaliser=run.dataset.normaliser)
    truth = np.asarray(dataset.hr_counts)
    reference = evaluate_split(dataset, {})
    geom = dataset.geometry
    origins = list(zip(dataset.tiles["x0_um"], dataset.tiles["y0_um"], strict=True))
    ceiling = float(np.mean(split_half_ceiling(load_example(), dataset.genes, origins, geom.hr_bin_um, geom.tile_hr)))
    rows = []
    for method, n_steps in samplers:
        sampler = SamplerConfig(method=method, steps=None if (method == "ddpm" and n_steps == 1000) else n_steps,
                                num_samples=k)
        t0 = time.perf_counter()
        preds = predict_tiles(run, dataset, sampler, batch_size=len(dataset), seed=seed, progress=False)
        seconds = (time.perf_counter() - t0) / (len(dataset) * k)
        mean_metrics = evaluate_maps(preds.mean, truth, dataset.normaliser)
        singles = [evaluate_maps(dataset.normaliser.to_counts(s), truth)["pcc"] for s in preds.samples_model]
        row = {"method": method, "steps": n_steps, "pcc": mean_metrics["pcc"], "rmse_counts": mean_metrics["rmse_counts"],
               "rmse_model": mean_metrics["rmse_model"], "paper_rmse": mean_metrics["paper_rmse"],
               "paper_abs_pcc": mean_metrics["paper_abs_pcc"], "pcc_single_sample": float(np.mean(singles)),
               "seconds_per_tile_per_sample": seconds}
        rows.append(row)
        print(f"  s={scale} {method:5s} {n_steps:4d} steps: PCC {row['pcc']:.3f} (single {row['pcc_single_sample']:.3f}) "
              f"RMSE {row['rmse_counts']:.3f}  {seconds:.2f} s/tile/sample", flush=True)
    bic = reference["bicubic"]
    print(f"  s={scale} bicubic: PCC {bic['pcc']:.3f} RMSE {bic['rmse_counts']:.3f}; noise ceiling PCC {ceiling:.3f}")
    plot_metric_vs_steps(rows, out / f"sampler_quality_s{scale}.png",
                         reference={"bicubic": bic["pcc"], "noise ceiling": ceiling}, metric="pcc",
                         title=f"Held-out Xenium region, s = {scale} (K = {k} mean, {len(dataset)} tiles)")
    return {"scale": scale, "train_steps": steps, "k": k, "test_tiles": len(dataset), "genes": len(dataset.genes),
            "rows": rows, "bicubic": {key: bic[key] for key in ("pcc", "rmse_counts", "paper_rmse", "paper_abs_pcc")},
            "noise_ceiling_pcc": ceiling, "threads": torch.get_num_threads()}


def markdown(results: list[dict]) -> str:
    lines = ["| scale | sampler | steps | PCC (K-mean) | PCC (1 sample) | RMSE counts | paper RMSE | s / tile / sample |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            lines.append(f"| {res['scale']}x | {r['method']} | {r['steps']} | {r['pcc']:.3f} | {r['pcc_single_sample']:.3f} | "
                         f"{r['rmse_counts']:.3f} | {r['paper_rmse']:.3f} | {r['seconds_per_tile_per_sample']:.2f} |")
        b = res["bicubic"]
        lines.append(f"| {res['scale']}x | bicubic | - | {b['pcc']:.3f} | - | {b['rmse_counts']:.3f} | {b['paper_rmse']:.3f} | - |")
        lines.append(f"| {res['scale']}x | noise ceiling | - | {res['noise_ceiling_pcc']:.3f} | - | - | - | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampler_quality"))
    parser.add_argument("--steps", type=int, default=2000, help="training steps per scale")
    parser.add_argument("--k", type=int, default=4, help="samples per tile")
    parser.add_argument("--scales", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="30 training steps, 3 samplers, K = 2")
    args = parser.parse_args()
    samplers = QUICK if args.quick else SAMPLERS
    steps, k = (30, 2) if args.quick else (args.steps, args.k)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [bench_scale(args.out, s, steps, samplers, k, args.seed) for s in args.scales]
    (args.out / "sampler_quality.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "sampler_quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
