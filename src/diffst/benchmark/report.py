"""Summary of the benchmark cells: pooled metrics with bootstrap intervals, ceiling, tables and figures."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from diffst.benchmark.methods import ABLATIONS, COMPETITORS, DIFFST_ANSWERS, METHODS

METRICS = ("pcc", "pcc_pooled", "region_pcc", "rmse_counts", "region_rmse_counts", "mae_counts", "ssim")
PAPER_METRICS = ("paper_abs_pcc", "paper_rmse")


def _nanmean(values, axis=None, weights=None):
    v = np.asarray(values, dtype=np.float64)
    if weights is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(v, axis=axis)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * (v.ndim - 1))), v.shape)
    ok = np.isfinite(v)
    total = np.where(ok, w, 0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.where(ok, v * w, 0).sum(axis=0) / np.where(total > 0, total, 1), np.nan)


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def summarise(result: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Pool the cells of each scale and method over folds.

    Each metric is the tile-weighted mean of the fold metrics (RMSE: root of the pooled mean squared error);
    ``pcc_ci`` is the percentile bootstrap 95 % interval of the mean per-tile PCC over the test tiles of all
    folds; ``pcc_vs_bicubic`` (with ``_ci``) the mean paired difference of per-tile PCC to bicubic on the
    same tiles, with its bootstrap interval; ``gap_closed`` is ``(pcc - bicubic) / (ceiling - bicubic)``.
    ``versus_best`` (per scale): Diff-ST's answer (:data:`~diffst.benchmark.methods.DIFFST_ANSWERS`, the
    first run) against the competitor of highest PCC, the paired per-tile difference and its interval (and
    against every competitor under ``each``, every other Diff-ST variant under ``ablations``).
    """
    from diffst.evaluation.ceiling import summarise_ceiling
    from diffst.evaluation.metrics import bootstrap_interval

    genes = result["setup"]["genes"]
    summary: dict[str, Any] = {}
    for scale in result["setup"]["scales"]:
        cells = [c for c in result["cells"] if c["scale"] == scale]
        folds = [f for f in result["folds"] if f["scale"] == scale and f["status"] == "ok"]
        if not cells:
            continue
        entry: dict[str, Any] = {"n_folds": len(folds), "n_folds_skipped": sum(
            f["status"] != "ok" for f in result["folds"] if f["scale"] == scale), "methods": {}}
        ceiling_rows = [(f["ceiling_per_gene"], f["n_test_tiles"]) for f in folds if "ceiling_per_gene" in f]
        ceiling = None
        if ceiling_rows:
            per_gene = _nanmean([_floats(r) for r, _ in ceiling_rows], axis=0, weights=[n for _, n in ceiling_rows])
            entry["ceiling"] = {**summarise_ceiling(per_gene, genes), "per_gene": per_gene.tolist()}
            ceiling = entry["ceiling"]["pcc"]
        bicubic = {c["fold"]: _floats(c["per_tile_pcc"]) for c in cells if c["method"] == "bicubic"}
        for method in [m for m in METHODS if any(c["method"] == m for c in cells)]:
            mine = [c for c in cells if c["method"] == method]
            n = [c["n_test_tiles"] for c in mine]
            row: dict[str, Any] = {"n_tiles": int(sum(n)), "n_folds": len(mine)}
            for key in (*METRICS, *PAPER_METRICS):
                vals = _floats([c["metrics"].get(key) for c in mine])
                if key in ("rmse_counts", "region_rmse_counts"):
                    row[key] = float(np.sqrt(_nanmean(vals**2, weights=n)))
                else:
                    row[key] = float(_nanmean(vals, weights=n))
            per_tile = np.concatenate([_floats(c["per_tile_pcc"]) for c in mine])
            row["pcc_ci"] = list(bootstrap_interval(per_tile, seed=seed))
            mse = np.concatenate([_floats(c["per_tile_mse"]) for c in mine])
            lo, hi = bootstrap_interval(mse, seed=seed)
            row["rmse_counts_ci"] = [float(np.sqrt(lo)), float(np.sqrt(hi))]
            if all(c["fold"] in bicubic for c in mine):  # paired: the same test tiles, tile by tile
                diff = np.concatenate([_floats(c["per_tile_pcc"]) - bicubic[c["fold"]] for c in mine])
                row["pcc_vs_bicubic"] = float(_nanmean(diff))
                row["pcc_vs_bicubic_ci"] = list(bootstrap_interval(diff, seed=seed))
            row["per_gene_pcc"] = _nanmean([_floats(c["per_gene_pcc"]) for c in mine], axis=0, weights=n).tolist()
            row["seconds"] = float(sum(c.get("seconds", 0.0) for c in mine))
            entry["methods"][method] = row
        versus = _versus_best(cells, entry["methods"], seed)
        if versus is not None:
            entry["versus_best"] = versus
        base = entry["methods"].get("bicubic", {}).get("pcc")
        for row in entry["methods"].values():
            gap = None
            if ceiling is not None and base is not None and np.isfinite(ceiling) and abs(ceiling - base) > 1e-12:
                gap = (row["pcc"] - base) / (ceiling - base)
            row["gap_closed"] = gap
        summary[f"s{scale}"] = entry
    return summary


def _versus_best(cells: list[dict[str, Any]], rows: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """Diff-ST's answer minus each competitor and each ablation, paired per test tile (None without both sides).

    Returns the strongest competitor's entry (``method``, ``best_competitor``, ``pcc_diff`` and its
    interval, ``rmse_counts_diff``) with every competitor's under ``each`` and every other Diff-ST variant's
    (:data:`~diffst.benchmark.methods.ABLATIONS`) under ``ablations``.
    """
    from diffst.evaluation.metrics import bootstrap_interval

    ours = next((m for m in DIFFST_ANSWERS if m in rows), None)
    others = [m for m in COMPETITORS if m in rows]
    if ours is None or not others:
        return None
    per_fold = {(c["method"], c["fold"]): _floats(c["per_tile_pcc"]) for c in cells}

    def paired(other: str) -> dict[str, Any]:
        folds = sorted(f for m, f in per_fold if m == ours and (other, f) in per_fold)
        diff = np.concatenate([per_fold[ours, f] - per_fold[other, f] for f in folds])
        return {"pcc_diff": float(_nanmean(diff)), "pcc_diff_ci": list(bootstrap_interval(diff, seed=seed)),
                "rmse_counts_diff": float(rows[ours]["rmse_counts"] - rows[other]["rmse_counts"])}

    each = {other: paired(other) for other in others}
    best = max(others, key=lambda m: rows[m]["pcc"])
    variants = {m: paired(m) for m in ABLATIONS if m in rows and m not in DIFFST_ANSWERS}
    return {"method": ours, "best_competitor": best, **each[best], "each": each, "ablations": variants}


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _ci(row: dict, key: str) -> str:
    lo, hi = row.get(f"{key}_ci", (None, None))
    return f"{_fmt(row[key])} [{_fmt(lo)}, {_fmt(hi)}]"


def _protocol(setup: dict[str, Any]) -> str:
    """One phrase for the split protocol and (spot-only slides) the self-supervised mode."""
    test = setup.get("test_samples") or []
    if test:
        train = [s for s in setup["samples"] if s not in test]
        text = f"sample split: train on {', '.join(train)}, test on {', '.join(test)} (held out whole)"
    else:
        text = f"{setup['k']} region folds per sample ({setup['layout']} layout)"
    if setup.get("self_supervised"):
        text += ("; self-supervised on spots (HR = the spots, LR = sums of s x s spots; scored on measured spots "
                 "of fully measured blocks)")
    return text


def markdown(result: dict[str, Any]) -> str:
    """``benchmark.md``: Table 1 (methods x scales x metrics) and Table 2 (Diff-ST ablations)."""
    setup, summary = result["setup"], result["summary"]
    lines = [
        "# Diff-ST benchmark", "",
        f"Samples {', '.join(setup['samples'])}; `{setup['preset']}` tiles; {_protocol(setup)}; "
        f"{len(setup['genes'])} genes; budget `{setup['budget']}` (preset `{setup['budget_preset']}`); "
        f"seed {setup['seed']}.",
        "Metrics pooled over the test tiles of all folds; brackets: bootstrap 95 % interval over test tiles. "
        "PCC is the signed Pearson r per tile and gene; RMSE / MAE in counts per HR bin; gap closed = "
        "(PCC − bicubic) / (ceiling − bicubic); region PCC / RMSE: on each fold's held-out region stitched from "
        "its test tiles (every bin once, overlaps averaged). Paper protocol (per-map min-max, |r|) in its own "
        "columns.", "",
        "## Table 1: methods", "",
        "| scale | method | tiles | PCC [95 % CI] | ΔPCC vs bicubic, paired [95 % CI] | pooled PCC | region PCC "
        "| RMSE [95 % CI] | region RMSE | MAE | SSIM | gap closed | paper |PCC| | paper RMSE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in summary.items():
        for method, row in entry["methods"].items():
            paired = _ci(row, "pcc_vs_bicubic") if "pcc_vs_bicubic" in row else "–"
            lines.append(f"| {key} | {method} | {row['n_tiles']} | {_ci(row, 'pcc')} | {paired} | {_fmt(row['pcc_pooled'])} | "
                         f"{_fmt(row['region_pcc'])} | {_ci(row, 'rmse_counts')} | {_fmt(row['region_rmse_counts'])} | "
                         f"{_fmt(row['mae_counts'])} | {_fmt(row['ssim'])} | "
                         f"{_fmt(row['gap_closed'], 2)} | {_fmt(row['paper_abs_pcc'])} | {_fmt(row['paper_rmse'])} |")
        if "ceiling" in entry:
            c = entry["ceiling"]
            lines.append(f"| {key} | noise ceiling | | {_fmt(c['pcc'])} | | | | | | | | 1 | | |")
    notes = []
    for key, entry in summary.items():
        v = entry.get("versus_best")
        if v:
            lo, hi = v["pcc_diff_ci"]
            notes.append(f"{key}: {v['method']} − {v['best_competitor']} (the competitor of highest PCC), paired per "
                         f"tile: ΔPCC {v['pcc_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], ΔRMSE {v['rmse_counts_diff']:+.3f} "
                         "counts.")
    for key, entry in summary.items():
        skipped = entry.get("ceiling", {}).get("n_genes_skipped")
        if skipped:
            notes.append(f"{key}: the ceiling skips {skipped} gene(s) without counts in the test tiles.")
        if entry["n_folds_skipped"]:
            notes.append(f"{key}: {entry['n_folds_skipped']} fold(s) skipped (reasons in benchmark.json).")
    lines += ["", *notes]
    versus = [(key, entry["versus_best"]) for key, entry in summary.items() if entry.get("versus_best")]
    if versus:
        lines += ["", "Diff-ST's answer minus each competitor, paired on the same test tiles (ΔPCC [95 % CI]; ΔRMSE in "
                  "counts):", "", "| scale | Diff-ST | competitor | ΔPCC [95 % CI] | ΔRMSE |", "|---|---|---|---|---|"]
        for key, v in versus:
            for other, d in v["each"].items():
                lo, hi = d["pcc_diff_ci"]
                lines.append(f"| {key} | {v['method']} | {other} | {d['pcc_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                             f"{d['rmse_counts_diff']:+.3f} |")
    lines += ["", "## Table 2: Diff-ST ablations", ""]
    ablations = [(key, m, entry["methods"][m]) for key, entry in summary.items() for m in ABLATIONS
                 if m in entry["methods"]]
    if ablations:
        lines += ["| scale | variant | PCC [95 % CI] | Diff-ST − variant, paired ΔPCC [95 % CI] | RMSE [95 % CI] | SSIM "
                  "| gap closed |", "|---|---|---|---|---|---|---|"]
        for key, m, row in ablations:
            d = (summary[key].get("versus_best") or {}).get("ablations", {}).get(m)
            paired = f"{d['pcc_diff']:+.3f} [{d['pcc_diff_ci'][0]:+.3f}, {d['pcc_diff_ci'][1]:+.3f}]" if d else "–"
            lines.append(f"| {key} | {m} | {_ci(row, 'pcc')} | {paired} | {_ci(row, 'rmse_counts')} | "
                         f"{_fmt(row['ssim'])} | {_fmt(row['gap_closed'], 2)} |")
    else:
        lines.append(f"No Diff-ST variant was run (add some of {', '.join(ABLATIONS)} to --methods).")
    calibration = result.get("calibration") or {}
    if calibration:
        lines += ["", "## Intervals: coverage of held-out observed counts", "",
                  "Central 50 % and 90 % intervals of each bin's observed count (the K samples as rates plus Poisson "
                  "noise). Raw: as sampled; calibrated: the samples' spread around the answer scaled by a factor "
                  "fitted on the other folds' held-out tiles (cross-fitted, so no fold is calibrated on itself).", "",
                  "| scale | method | raw 50 % | raw 90 % | calibrated 50 % | calibrated 90 % | factor per fold |",
                  "|---|---|---|---|---|---|---|"]
        for key, methods in calibration.items():
            for m, row in methods.items():
                lines.append(f"| {key} | {m} | {row['raw_50']:.3f} | {row['raw_90']:.3f} | {row['calibrated_50']:.3f} | "
                             f"{row['calibrated_90']:.3f} | {', '.join(f'{x:g}' for x in row['spread'])} |")
    skipped = [f for f in result["folds"] if f["status"] != "ok"]
    if skipped:
        lines += ["", "## Skipped folds", ""] + [f"- s{f['scale']} {f['fold']}: {f['reason']}" for f in skipped]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from diffst.atomic import atomic_output

    FigureCanvasAgg(fig)
    with atomic_output(path, directory=False) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_metrics(entry: dict[str, Any], scale_key: str, path: Path) -> None:
    """Bars of PCC, RMSE and SSIM per method with bootstrap whiskers; ceiling as a line on PCC."""
    from matplotlib.figure import Figure

    names = list(entry["methods"])
    fig = Figure(figsize=(3.2 * 3, 3.4))
    for ax, key, label in zip(fig.subplots(1, 3), ("pcc", "rmse_counts", "ssim"),
                              ("signed PCC", "RMSE (counts)", "SSIM"), strict=True):
        vals = np.array([entry["methods"][m][key] for m in names], dtype=np.float64)
        yerr = None
        if f"{key}_ci" in entry["methods"][names[0]]:
            ci = np.array([[np.nan if v is None else v for v in entry["methods"][m][f"{key}_ci"]] for m in names])
            yerr = np.nan_to_num(np.abs(ci - vals[:, None]).T)
        ax.bar(range(len(names)), vals, yerr=yerr, capsize=3, color="tab:blue")
        if key == "pcc" and "ceiling" in entry:
            ax.axhline(entry["ceiling"]["pcc"], color="k", ls="--", lw=1, label="noise ceiling")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{label}, {scale_key}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_per_gene(entry: dict[str, Any], genes: list[str], scale_key: str, path: Path) -> None:
    """Per-gene PCC of each method (y) against bicubic (x); points above the diagonal beat bicubic."""
    from matplotlib.figure import Figure

    others = [m for m in entry["methods"] if m != "bicubic"]
    base = np.array(entry["methods"]["bicubic"]["per_gene_pcc"], dtype=np.float64)
    fig = Figure(figsize=(3.2 * max(len(others), 1), 3.3))
    axes = np.atleast_1d(fig.subplots(1, max(len(others), 1)))
    for ax, m in zip(axes, others, strict=False):
        y = np.array(entry["methods"][m]["per_gene_pcc"], dtype=np.float64)
        ax.scatter(base, y, s=12)
        lo = np.nanmin(np.concatenate([base, y, [0.0]]))
        hi = np.nanmax(np.concatenate([base, y, [1.0]]))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
        ax.set_xlabel("bicubic PCC per gene", fontsize=8)
        ax.set_ylabel(f"{m} PCC per gene", fontsize=8)
        ax.set_title(f"{m} vs bicubic, {scale_key} ({len(genes)} genes)", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _example_methods(entry: dict[str, Any]) -> list[str]:
    """Methods drawn in the example maps: bicubic, the best other non-Diff-ST method by PCC, Diff-ST."""
    from diffst.benchmark.methods import BASELINES, LEARNED

    others = [m for m in entry["methods"] if m != "bicubic" and (m in BASELINES or m in LEARNED)
              and not m.startswith(("regression", "diffst"))]
    best = max(others, key=lambda m: entry["methods"][m]["pcc"], default=None)
    diffst = "diffst" if "diffst" in entry["methods"] else None
    return [m for m in ("bicubic", best, diffst) if m is not None]


def plot_examples(cells: list[dict[str, Any]], methods: list[str], genes: list[str], title: str, path: Path) -> bool:
    """Stitched held-out region of one fold: observed counts and each method's, one column per gene.

    Returns False (and draws nothing) when the cells carry no example maps (cells of older versions).
    """
    from matplotlib.figure import Figure

    by_method = {c["method"]: c for c in cells if c.get("example")}
    methods = [m for m in methods if m in by_method]
    if not methods:
        return False
    truth = _floats_nd(by_method[methods[0]]["example"]["truth"])
    rows = [("observed", truth)] + [(m, _floats_nd(by_method[m]["example"]["pred"])) for m in methods]
    n_genes = truth.shape[0]
    fig = Figure(figsize=(2.4 * n_genes, 2.0 * len(rows) + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), n_genes, squeeze=False))
    for g in range(n_genes):
        vmax = float(np.nanpercentile(truth[g], 99)) or 1.0
        for r, (label, maps) in enumerate(rows):
            ax = axes[r, g]
            im = ax.imshow(maps[g], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(genes[g], fontsize=9)
            if g == 0:
                ax.set_ylabel(label, fontsize=8)
        bar = fig.colorbar(im, ax=axes[-1, g], orientation="horizontal", fraction=0.08, pad=0.06)
        bar.set_label("counts per bin", fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return True


def _floats_nd(values) -> np.ndarray:
    """Nested lists with None (NaN in JSON) to a float array."""
    return np.array(values, dtype=object).astype(np.float64) if values is not None else np.empty(0)


def plot_calibration(calibration: dict[str, Any], path: Path) -> None:
    """Observed against nominal coverage of the 50 % and 90 % intervals, raw and calibrated, per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(calibration), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(calibration)))
    for ax, (key, methods) in zip(axes, calibration.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
        for i, (m, row) in enumerate(methods.items()):
            colour = f"C{i}"
            ax.plot([0.5, 0.9], [row["raw_50"], row["raw_90"]], "o:", color=colour, label=f"{m}, raw")
            ax.plot([0.5, 0.9], [row["calibrated_50"], row["calibrated_90"]], "s-", color=colour,
                    label=f"{m}, calibrated")
        ax.set_xlim(0.3, 1.0)
        ax.set_ylim(0.3, 1.0)
        ax.set_xlabel("nominal coverage", fontsize=8)
        ax.set_ylabel("held-out coverage", fontsize=8)
        ax.set_title(f"interval calibration, {key}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def write_report(out: str | Path, result: dict[str, Any]) -> dict[str, Path]:
    """Write ``benchmark.json``, ``benchmark.md`` and ``figures/`` (metrics and per-gene PCC per scale)."""
    from diffst.atomic import atomic_output
    from diffst.benchmark.store import write_json

    out = Path(out)
    paths = {"json": out / "benchmark.json", "md": out / "benchmark.md"}
    # Example maps stay in the cell files; the summary file keeps numbers only.
    write_json(paths["json"], {**result, "cells": [{k: v for k, v in c.items() if k != "example"}
                                                   for c in result["cells"]]})
    with atomic_output(paths["md"], directory=False) as tmp:
        tmp.write_text(markdown(result))
    if result.get("calibration"):
        paths["calibration"] = out / "figures" / "calibration.png"
        plot_calibration(result["calibration"], paths["calibration"])
    for key, entry in result["summary"].items():
        paths[f"metrics_{key}"] = out / "figures" / f"metrics_{key}.png"
        plot_metrics(entry, key, paths[f"metrics_{key}"])
        paths[f"per_gene_{key}"] = out / "figures" / f"per_gene_pcc_{key}.png"
        plot_per_gene(entry, result["setup"]["genes"], key, paths[f"per_gene_{key}"])
        scale = int(key[1:])
        first = next((f for f in result["folds"] if f["scale"] == scale and f["status"] == "ok"), None)
        if first is not None:
            cells = [c for c in result["cells"] if c["scale"] == scale and c["fold"] == first["fold"]]
            genes = result["setup"]["genes"][: len(next((c["example"]["truth"] for c in cells if c.get("example")), []))]
            target = out / "figures" / f"examples_{key}.png"
            title = f"{key}: held-out region of {first['fold']} (stitched test tiles)"
            if plot_examples(cells, _example_methods(entry), genes, title, target):
                paths[f"examples_{key}"] = target
    return paths
