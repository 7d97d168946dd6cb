"""Seed ensembles of Diff-ST's stage one on the built-in crop's region folds: how much of the noise is the seed?

Runs ``diffst benchmark --example --methods bicubic,regression --members 1 --budget full`` once per seed (same
folds, same genes; each seed's training draws differ; one run per seed, not the recipe's ensemble) and scores, on the same held-out tiles, each seed's answer and the mean
of all seeds' answers in counts (a seed ensemble; each answer is spot-consistent, so their mean is too). Every
answer is the default one (the mean over the tile's 8 square symmetries). Results:
``benchmarks/results/seed_ensemble.json`` (per scale: PCC and RMSE per seed, of the ensemble and of bicubic,
overall and per fold).

Usage::

    python benchmarks/bench_seed_ensemble.py [--scales 5,10] [--seeds 0,1,2,3] [--work DIR]

A rerun with the same ``--work`` reuses finished benchmark cells.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_seed(work: Path, scale: int, seed: int) -> Path:
    """Run (or reuse) the benchmark of one seed at one scale; returns its output folder."""
    out = work / f"seed{seed}_s{scale}"
    cmd = [sys.executable, "-m", "diffst.cli", "benchmark", "--example", "--scales", str(scale), "--budget", "full",
           "--methods", "bicubic,regression", "--members", "1", "--seed", str(seed), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def score(outs: list[Path], scale: int) -> dict:
    """Per-fold and overall PCC / RMSE of each seed, of their mean, and of bicubic, on the same test tiles."""
    from diffst.data.dataset import PreparedTiles
    from diffst.evaluation.report import evaluate_masked_maps, scoring_mask

    folds = sorted(p.name for p in (outs[0] / "cells" / f"s{scale}").iterdir() if p.is_dir())
    rows: dict[str, list[dict]] = {}
    for fold in folds:
        test = PreparedTiles(outs[0] / "prepared" / f"s{scale}" / fold, "test")
        truth = np.asarray(test.hr_counts)
        mask = scoring_mask(test)
        if mask is None:
            mask = np.ones((truth.shape[0], *truth.shape[-2:]), dtype=bool)
        answers = {f"seed{i}": np.load(o / "cells" / f"s{scale}" / fold / "regression.npz")["counts"]
                   for i, o in zip(SEEDS, outs, strict=True)}
        answers["ensemble"] = np.mean(list(answers.values()), axis=0)
        answers["bicubic"] = np.load(outs[0] / "cells" / f"s{scale}" / fold / "bicubic.npz")["counts"]
        for name, counts in answers.items():
            m = evaluate_masked_maps(counts, truth, mask)
            rows.setdefault(name, []).append({"fold": fold, "pcc": m["pcc"], "rmse_counts": m["rmse_counts"]})
    return {name: {"pcc": float(np.mean([r["pcc"] for r in v])), "rmse_counts": float(np.mean([r["rmse_counts"] for r in v])),
                   "folds": v} for name, v in rows.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="5,10")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffst_seed_ensemble"))
    args = parser.parse_args()
    SEEDS = [int(s) for s in args.seeds.split(",")]
    result = {"what": "stage one (8-view answer) per seed and the mean of the seeds' answers, region 4-fold CV on "
                      "the built-in crop, the same held-out tiles; PCC per tile and gene averaged over folds",
              "command": "python benchmarks/bench_seed_ensemble.py --scales " + args.scales + " --seeds " + args.seeds,
              "scales": {}}
    for scale in (int(s) for s in args.scales.split(",")):
        outs = [run_seed(args.work, scale, seed) for seed in SEEDS]
        result["scales"][str(scale)] = summary = score(outs, scale)
        for name, v in summary.items():
            print(f"s{scale} {name:9s} PCC {v['pcc']:.4f}  RMSE {v['rmse_counts']:.4f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "seed_ensemble.json").write_text(json.dumps(result, indent=1))
