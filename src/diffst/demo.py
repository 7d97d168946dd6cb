"""The main job on the built-in real example.

:func:`run_demo` prepares the example, trains Diff-ST's two stages with the ``cpu`` preset
(:mod:`diffst.training.recipe`), predicts the held-out region, compares with bicubic interpolation, the
training-free baselines and the noise ceiling on the same tiles, and saves AnnData, metrics and figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from diffst.config import parse_config
from diffst.errors import InputError
from diffst.example import prepare_example_data

__all__ = ["best_baseline", "run_demo"]

def run_demo(out: str | Path = "demo_output", scale: int = 10, steps: int = 2000, num_samples: int = 4,
             seed: int = 0, device: str = "auto", progress: bool = True) -> dict:
    """Run the whole job with the ``cpu`` run preset (its sampler: DPM-Solver++, 20 steps).

    Parameters
    ----------
    out
        Output folder. Writes ``prepared_s<scale>/`` (the prepared example), ``run_s<scale>-regression/`` and
        ``run_s<scale>/`` (stage one and stage two; unfinished runs are resumed), ``prediction_s<scale>.h5ad``,
        ``metrics_s<scale>.json``, ``comparison_s<scale>.png`` and ``slide_s<scale>.png`` (the held-out region:
        histology, LR spots, answer, std, observed).
    scale
        Super-resolution factor (5 or 10).
    steps
        Training steps of stage two (the diffusion); stage one trains for
        :data:`~diffst.training.recipe.STAGE_ONE_STEPS` steps (fewer if ``steps`` is smaller).
    num_samples
        K samples per held-out tile (mean and standard deviation).
    seed, device
        Random seed and ``auto`` / ``cpu`` / ``cuda``.
    progress
        Show progress bars.

    Returns
    -------
    dict
        The metrics also written to ``metrics_s<scale>.json``.
    """
    from diffst.diffusion.config import SamplerConfig
    from diffst.evaluation.report import evaluate_split
    from diffst.example import load_example
    from diffst.inference.predict import predict_checkpoint, to_anndata, write_h5ad
    from diffst.inference.provenance import prediction_provenance
    from diffst.plotting.slide import plot_slide
    from diffst.training.recipe import STAGE_ONE_STEPS, train_two_stage

    out = Path(out)
    # Everything the user chose is checked before minutes of training.
    if steps < 1:
        raise InputError(f"steps={steps}: the demo trains for at least one step.")
    config = {
        "preset": "cpu", "seed": seed, "device": device, "run_dir": str(out / f"run_s{scale}"),
        "data": {"path": str(out / f"prepared_s{scale}"), "example": {"scale": scale}},
        "train": {"steps": steps, "checkpoint_every": max(steps // 4, 1), "keep_last": 2},
    }
    cfg = parse_config(config, "demo")
    SamplerConfig(**{**cfg.sampler.model_dump(), "num_samples": num_samples})
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.time()
    example = load_example()
    prepare_example_data(cfg, sample=example, progress=progress)
    timings["prepare_s"] = time.time() - t0

    t0 = time.time()
    train_two_stage(config, stage_one_steps=min(steps, STAGE_ONE_STEPS), name="demo")
    timings["train_s"] = time.time() - t0

    t0 = time.time()
    dataset, preds, extras = predict_checkpoint(cfg.run_dir, cfg.data.path, split="test",
                                                sampler={"num_samples": num_samples}, seed=seed, device=device,
                                                progress=progress)
    timings["predict_s"] = time.time() - t0
    provenance = prediction_provenance(extras, cfg.data.path, "test", dataset.meta, preds.samples_model.shape[0])
    adata = to_anndata(dataset, preds, extra_uns=provenance)
    write_h5ad(adata, out / f"prediction_s{scale}.h5ad")
    plot_slide(adata, None, out / f"slide_s{scale}.png")
    report = evaluate_split(dataset, {**_baselines(cfg.data.path), "diffst": preds.mean})
    _report(out, scale, steps, seed, example, dataset, preds, extras, report, timings)
    return report


def _baselines(data: Path) -> dict[str, np.ndarray]:
    """Predict the held-out tiles with the training-free baselines (bicubic comes with the report)."""
    from diffst.benchmark.methods import predict_method

    return {m: predict_method(m, data) for m in ("ridge", "tesla", "bicubic+spots", "ridge+spots", "tesla+spots")}


def best_baseline(report: dict) -> str:
    """Return the name of the baseline with the highest PCC in a demo report."""
    names = [m for m in report if m not in ("diffst", "noise_ceiling", "timings", "setup")]
    return max(names, key=lambda m: report[m]["pcc"])


def _report(out: Path, scale: int, steps: int, seed: int, example, dataset, preds, extras, report: dict,
            timings: dict) -> None:
    """Add the noise ceiling, timings and setup to ``report``; write ``metrics_s<scale>.json`` and the figure."""
    from diffst.atomic import atomic_output
    from diffst.baselines import interpolate_lr
    from diffst.evaluation.ceiling import split_half_ceiling
    from diffst.plotting.compare import plot_comparison

    origins = list(zip(dataset.tiles["x0_um"], dataset.tiles["y0_um"], strict=True))
    geom = dataset.geometry
    ceiling = split_half_ceiling(example, dataset.genes, origins, geom.hr_bin_um, geom.tile_hr, seed=seed)
    report["noise_ceiling"] = {"pcc": float(np.mean(ceiling))}
    report["timings"] = {k: round(v, 1) for k, v in timings.items()}
    report["setup"] = {"scale": scale, "train_steps": steps, "sampler": extras["sampler"], "test_tiles": len(dataset),
                       "genes": dataset.genes, "hr_bin_um": geom.hr_bin_um, "lr_bin_um": geom.lr_bin_um}
    with atomic_output(out / f"metrics_s{scale}.json", directory=False) as tmp:
        tmp.write_text(json.dumps(report, indent=2))

    tile = int(np.argmax(dataset.tiles["n_counts"].to_numpy()))
    truth = np.asarray(dataset.hr_counts[tile])
    bicubic = interpolate_lr(np.asarray(dataset.lr_counts[tile]), (geom.tile_hr, geom.tile_hr), geom.scale)
    show = [dataset.genes.index(g) for g in ("ERBB2", "KRT7", "POSTN", "LUM") if g in dataset.genes][:3] or [0, 1, 2]
    plot_comparison(dataset.tissue[tile], dataset.lr_counts[tile],
                    {"bicubic": bicubic, "Diff-ST": preds.mean[tile], "std (K samples)": preds.std[tile],
                     "observed": truth},
                    dataset.genes, show, out / f"comparison_s{scale}.png",
                    title=f"Held-out tile, {geom.lr_bin_um:g} µm -> {geom.hr_bin_um:g} µm (s = {scale}); "
                          f"PCC Diff-ST {report['diffst']['pcc']:.3f}, bicubic {report['bicubic']['pcc']:.3f}")
