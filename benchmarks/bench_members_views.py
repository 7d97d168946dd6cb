"""Diff-ST's stage-one answer for seed-ensemble sizes x square-symmetry views, on a finished benchmark's folds.

Reads the regression runs ``regression-<budget>-seed<k>`` that ``diffst benchmark --methods regression
--members M`` left in ``--work`` (one folder per scale, e.g. ``bench_s5``), and scores on each fold's held-out
tiles the answer of the first ``m`` seeds averaged over the first ``v`` of the tile's 8 symmetries, for every
``m`` in ``--members`` and ``v`` in ``--views``: what each network call (``m x v`` per tile) buys. No training.
Results: ``benchmarks/results/members_views.json`` (PCC and RMSE in counts per scale, tile-weighted over folds).

Usage::

    python benchmarks/bench_members_views.py --work bench_s5 --work bench_s10 [--members 1,2,4] [--views 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def score(work: Path, members: int, views: int, budget: str) -> dict:
    """Tile-weighted PCC and RMSE over the folds of one benchmark folder (one scale)."""
    from diffst.data.dataset import PreparedTiles
    from diffst.evaluation.report import evaluate_masked_maps, scoring_mask
    from diffst.inference.predict import predict_checkpoint
    from diffst.runs import load_base_run

    (scale_dir,) = sorted((work / "runs").iterdir())
    pccs, mses, tiles = [], [], []
    for fold in sorted(p for p in scale_dir.iterdir() if p.is_dir()):
        data = work / "prepared" / scale_dir.name / fold.name
        runs = [fold / f"regression-{budget}-seed{k}" for k in range(members)]
        missing = [r for r in runs if not r.is_dir()]
        if missing:
            raise SystemExit(f"{missing[0]} is missing: run diffst benchmark --methods regression --members {members}")
        _, preds, _ = predict_checkpoint(runs[0], data, device="cpu", progress=False, run=load_base_run(runs),
                                         sampler={"point_views": views})
        test = PreparedTiles(data, "test")
        truth = np.asarray(test.hr_counts)
        mask = scoring_mask(test)
        mask = np.ones((truth.shape[0], *truth.shape[-2:]), bool) if mask is None else mask
        m = evaluate_masked_maps(np.asarray(preds.mean), truth, mask)
        pccs.append(m["pcc"])
        mses.append(m["rmse_counts"] ** 2)
        tiles.append(len(test))
    w = np.asarray(tiles, float) / sum(tiles)
    return {"pcc": float(w @ pccs), "rmse_counts": float(np.sqrt(w @ mses)), "network_calls_per_tile": members * views,
            "n_tiles": int(sum(tiles))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, action="append", required=True, help="a benchmark output folder")
    parser.add_argument("--members", default="1,2,4")
    parser.add_argument("--views", default="1,2,4,8")
    parser.add_argument("--budget", default="full")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for work in args.work:
        scale = sorted((work / "runs").iterdir())[0].name
        for m in (int(x) for x in args.members.split(",")):
            for v in (int(x) for x in args.views.split(",")):
                row = score(work, m, v, args.budget)
                results[f"{scale} members {m} views {v}"] = row
                print(f"{scale} members {m} views {v} ({row['network_calls_per_tile']} calls): PCC {row['pcc']:.4f} "
                      f"RMSE {row['rmse_counts']:.3f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "members_views.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
