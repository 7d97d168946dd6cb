"""Command line: ``diffst prepare | train | predict | demo | benchmark``."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from diffst.errors import DiffSTError, TrainingInterrupted
from diffst.training.recipe import STAGE_ONE_MEMBERS, STAGE_ONE_STEPS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Diff-ST: super-resolved spatial transcriptomics.")


@app.callback()
def _root() -> None:
    """Diff-ST: super-resolved spatial transcriptomics from spots and histology."""


def _floats(text: str | None, n: int, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise typer.BadParameter(f"{what} needs {n} comma-separated numbers (finite), got '{text}'.")
    return values


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn every failure a user can cause into one readable line and a non-zero exit code."""
    from pydantic import ValidationError

    try:
        yield
    except TrainingInterrupted as exc:  # a request, not an error: the message says how to resume
        typer.echo(str(exc), err=True)
        raise typer.Exit(code=130) from None
    except DiffSTError as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
                        for e in exc.errors()))
    except MemoryError:
        _fail("out of memory; use fewer tiles, genes or samples (--samples), or a smaller --batch-size.")
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written in place of an existing output.", 130)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}; check the path, free disk space and permissions.")


def _positive(value: int, flag: str, minimum: int = 1) -> None:
    if value < minimum:
        raise typer.BadParameter(f"{flag} must be at least {minimum}, got {value}.")


@app.command()
def prepare(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Sample folders/files (Xenium outs, Visium outs, legacy ST folder, .h5ad).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder of the prepared dataset.")] = Path("prepared"),
    example: Annotated[bool, typer.Option(help="Use the built-in real Xenium example.")] = False,
    platform: Annotated[str, typer.Option(help="auto, xenium, visium, visium_hd, legacy_st, anndata or "
                                                 "spatialdata (a .zarr store; --image NAME picks its image "
                                                 "element, STORE.zarr/tables/NAME its table).")] = "auto",
    image: Annotated[Path | None, typer.Option(help="Image file, when not found in the sample folder.")] = None,
    pixel_size: Annotated[float | None, typer.Option(help="Image microns per pixel (else from metadata).")] = None,
    force_pixel_size: Annotated[bool, typer.Option(help="Xenium: use --pixel-size even where the image metadata or "
                                                        "the transcript/image agreement disagree (warn only).")] = False,
    min_qv: Annotated[float | None, typer.Option(help="Xenium: drop transcripts below this quality (default 20).")] = None,
    image_origin: Annotated[str | None, typer.Option(help="x,y microns of the image's top-left corner (Xenium crops).")] = None,
    preset: Annotated[str, typer.Option(help="Tile geometry preset: cpu or paper.")] = "cpu",
    scale: Annotated[int | None, typer.Option(help="Super-resolution factor s (5 or 10; default 10; with "
                                                   "--self-supervised any s >= 2, default 2).")] = None,
    self_supervised: Annotated[bool, typer.Option(help="Spot-only slides (Visium, legacy ST): the spots are the HR "
                                                       "ground truth (HR bin = spot pitch, bins without a spot "
                                                       "masked) and LR = s x s blocks of them, to train on the slide "
                                                       "itself.")] = False,
    sub_spot: Annotated[bool, typer.Option(help="Spot-only slides, for the sub-spot map of a --self-supervised "
                                                "model: the real spots are LR (bin = spot pitch), HR bins are "
                                                "pitch / s; same --scale and --tile-lr as for training.")] = False,
    tile_lr: Annotated[int | None, typer.Option(help="--self-supervised / --sub-spot: LR bins per tile side "
                                                     "(default: tiles of about 16 x 16 spots at training scale, as "
                                                     "many as fit).")] = None,
    n_genes: Annotated[int, typer.Option(help="Top-N genes by training counts.")] = 25,
    genes: Annotated[str | None, typer.Option(help="Comma-separated gene list (overrides --n-genes).")] = None,
    test_region: Annotated[str | None, typer.Option(help="x0,y0,x1,y1 µm held out for testing.")] = None,
    val_region: Annotated[str | None, typer.Option(help="x0,y0,x1,y1 µm held out for validation.")] = None,
    test_sample: Annotated[list[str] | None, typer.Option(help="Sample name held out for testing (repeatable).")] = None,
    val_sample: Annotated[list[str] | None, typer.Option(help="Sample name held out for validation (repeatable).")] = None,
    train_stride: Annotated[float | None, typer.Option(help="Stride (µm) between training tiles; default half a tile.")] = None,
    eval_stride: Annotated[float | None, typer.Option(help="Stride (µm) between val/test tiles; default half a tile.")] = None,
    min_tissue: Annotated[float, typer.Option(help="Minimum fraction of a tile that shows tissue.")] = 0.5,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Tile samples into a prepared dataset (arrays + dataset.json + tiles.csv + preview.png)."""
    from diffst.atomic import check_replaceable
    from diffst.core.geometry import spot_pitch_geometry, sub_spot_geometry, tile_preset
    from diffst.data.prepare import SplitSpec, is_prepared_dataset, prepare_dataset

    with _user_errors():
        if self_supervised and sub_spot:
            raise typer.BadParameter("--self-supervised (train on the spots) and --sub-spot (predict below them) "
                                     "exclude each other; prepare one dataset for each.")
        spot_mode = self_supervised or sub_spot
        if tile_lr is not None and not spot_mode:
            raise typer.BadParameter("--tile-lr applies to --self-supervised and --sub-spot only; the presets fix "
                                     "the tile otherwise.")
        if tile_lr is not None:
            _positive(tile_lr, "--tile-lr")
        check_replaceable(out, "prepared dataset", is_prepared_dataset, overwrite)
        split = SplitSpec(
            test_samples=test_sample or [], val_samples=val_sample or [],
            test_region=_floats(test_region, 4, "--test-region"), val_region=_floats(val_region, 4, "--val-region"),
            train_stride_um=train_stride, eval_stride_um=eval_stride,
        )
        geometry = None if spot_mode else tile_preset(preset, 10 if scale is None else scale)
        samples = _read_inputs(inputs or [], example, platform, {
            "image": image, "pixel_size_um": pixel_size, "image_origin_um": _floats(image_origin, 2, "--image-origin"),
            "force_pixel_size": force_pixel_size, "min_qv": min_qv})
        if spot_mode:  # HR bin = the spots' own pitch; the preset gives the image sizes
            geometry = spot_pitch_geometry(samples, 2 if scale is None else scale, tile_lr, preset=preset)
            geometry = sub_spot_geometry(geometry) if sub_spot else geometry
        if example and split.test_region is None and not split.test_samples:
            from diffst.example import EXAMPLE_TEST_REGION

            split.test_region = EXAMPLE_TEST_REGION
        typer.echo(f"Geometry: {geometry.describe()}")
        gene_list = [g.strip() for g in genes.split(",") if g.strip()] if genes else None
        path = prepare_dataset(samples, out, geometry, n_genes=n_genes, genes=gene_list,
                               split=split, min_tissue_fraction=min_tissue, overwrite=overwrite,
                               self_supervised=self_supervised, sub_spot=sub_spot)
    import json

    meta = json.loads((path / "dataset.json").read_text())
    typer.echo(f"Wrote {path}: tiles {meta['n_tiles']}, {len(meta['genes'])} genes, preview {path / 'preview.png'}")


_READER_FLAGS = {"image": "--image", "pixel_size_um": "--pixel-size", "image_origin_um": "--image-origin",
                 "force_pixel_size": "--force-pixel-size", "min_qv": "--min-qv"}


def _read_inputs(inputs, example, platform, options: dict):
    if example:
        from diffst.example import load_example

        return [load_example()]
    if not inputs:
        raise typer.BadParameter("Give at least one sample path, or --example for the built-in data.")
    from diffst import io

    platforms = ("auto", "xenium", "visium", "visium_hd", "legacy_st", "anndata", "spatialdata")
    if platform not in platforms:
        raise typer.BadParameter(f"Unknown platform '{platform}'; choose one of {list(platforms)}.")
    kwargs = {k: v for k, v in options.items() if v not in (None, False)}
    samples = []
    for path in inputs:
        detected = io.detect_platform(path)
        which = detected if platform == "auto" else platform
        if which.removesuffix("_hd") != detected:
            raise typer.BadParameter(f"--platform {platform}: {path} looks like {detected} data, not {which}. "
                                     "Use --platform auto, or point to the right files.")
        reader = {"xenium": io.read_xenium, "visium": io.read_visium, "legacy_st": io.read_legacy_st,
                  "anndata": io.read_anndata, "spatialdata": io.read_spatialdata}[detected]
        unused = [_READER_FLAGS[k] for k in kwargs if k not in inspect.signature(reader).parameters]
        if unused:
            raise typer.BadParameter(f"{', '.join(unused)} does not apply to {path} (read as {which}); drop it.")
        samples.append(io.read_sample(path, **kwargs))
    return samples


@app.command("train")
def train_command(
    config: Annotated[Path, typer.Option(help="Run configuration (YAML), e.g. configs/cpu_xenium.yaml.")],
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of run_dir.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config value: section.key=value.")] = None,
    two_stage: Annotated[bool, typer.Option(help="Diff-ST's recipe: a short spot-ratio regression trained with "
                                                  "several seeds (<run_dir>-regression, <run_dir>-regression-member1, "
                                                  "...), then the diffusion of their mean answer's residual.")] = False,
    stage_one_steps: Annotated[int, typer.Option(help="Training steps of stage one (--two-stage).")] = STAGE_ONE_STEPS,
    stage_one_members: Annotated[int, typer.Option(help="Seeds (members) of stage one's ensemble (--two-stage; "
                                                        "1: a single regression run).")] = STAGE_ONE_MEMBERS,
) -> None:
    """Train a Diff-ST denoiser (AdamW, EMA, checkpoints; multi-GPU via torchrun -m diffst.training).

    When the config has ``data.example`` and ``data.path`` is absent or empty, the built-in example is
    prepared there first. With --two-stage both stages are trained (finished ones reused, unfinished ones
    resumed); predict with the stage-two run folder.
    """
    from diffst.config import load_config
    from diffst.example import prepare_example_data
    from diffst.training import train, train_two_stage

    with _user_errors():
        cfg = load_config(config, set_ or [])
        prepare_example_data(cfg)
        if two_stage:
            _positive(stage_one_steps, "--stage-one-steps")
            _positive(stage_one_members, "--stage-one-members")
            bases, run_dir = train_two_stage(cfg, stage_one_steps=stage_one_steps, stage_one_members=stage_one_members,
                                             name=str(config))
            typer.echo(f"Stage one (regression, {len(bases)} seed(s)): {', '.join(map(str, bases))}")
        else:
            run_dir = train(cfg, resume=resume)
    typer.echo(f"Run folder: {run_dir}")


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder or run folder (latest checkpoint).")],
    data: Annotated[Path | None, typer.Option(help="Prepared dataset to predict (or --input).")] = None,
    input_: Annotated[Path | None, typer.Option("--input", help="A raw sample folder or file (as for prepare): all "
                                                "its tissue is tiled with overlap and blended into one map.")] = None,
    platform: Annotated[str, typer.Option(help="--input: auto, xenium, visium, visium_hd, legacy_st, "
                                                 "anndata or spatialdata (a .zarr store; --image NAME picks "
                                                 "its image element).")] = "auto",
    image: Annotated[Path | None, typer.Option(help="--input: image file, when not found in the sample folder.")] = None,
    pixel_size: Annotated[float | None, typer.Option(help="--input: image microns per pixel (else from metadata).")] = None,
    force_pixel_size: Annotated[bool, typer.Option(help="--input, Xenium: use --pixel-size even where checks disagree "
                                                        "(warn only).")] = False,
    min_qv: Annotated[float | None, typer.Option(help="--input, Xenium: drop transcripts below this quality.")] = None,
    image_origin: Annotated[str | None, typer.Option(help="--input: x,y microns of the image's top-left corner.")] = None,
    stride: Annotated[float | None, typer.Option(help="--input: stride (µm) between tiles; default half a tile.")] = None,
    min_tissue: Annotated[float, typer.Option(help="--input: minimum fraction of a tile that shows tissue.")] = 0.25,
    out: Annotated[Path, typer.Option(help="Output: NAME.h5ad (AnnData, one row per HR bin) or NAME.zarr (SpatialData "
                                           "store with histology, HR bins, LR spots; needs pip install "
                                           "'diffst[spatial]').")] = Path("prediction.h5ad"),
    split: Annotated[str, typer.Option(help="Split of the prepared dataset: train, val or test.")] = "test",
    sampler: Annotated[str | None, typer.Option(help="ddpm, ddim or dpmpp (default: the run's sampler setting).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps; 0 = all of the model's diffusion steps (the paper's "
                                                   "DDPM). Default: the run's sampler setting.")] = None,
    samples: Annotated[int | None, typer.Option(help="K samples per tile: mean in X, std in layers['std'] "
                                                     "(default: the run's sampler setting).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per batch.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed of the sampling noise.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    evaluate: Annotated[bool, typer.Option(help="Also compare with bicubic and the ground truth (if any).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing prediction written by Diff-ST.")] = False,
) -> None:
    """Predict HR maps in counts and write AnnData or a SpatialData store (X = mean, layers std / observed).

    Samples with the run's own ``sampler:`` settings; --sampler, --steps and --samples override them. The
    output's ``uns['diffst']`` records the checkpoint, sampler, seed, K, versions and the input files with
    their sha256 (a SpatialData .zarr store as one entry: its total size and one digest over its files).

    Each finished tile is kept in a hidden folder beside the output (``.NAME.partial/``) as soon as its batch
    is done; if the command is stopped (Ctrl-C, kill -9, a crash), running it again with the same options
    reuses those tiles and gives the same output as an uninterrupted run. The folder is removed once the
    output is written. Memory does not grow with the number of tiles or K: tiles are predicted batch by
    batch and stitched band by band into the .h5ad as it is written.
    """
    from diffst.atomic import check_replaceable
    from diffst.inference.output import StoreTiles, write_h5ad_stream
    from diffst.inference.predict import (
        check_sample_memory,
        interval_layer_names,
        is_diffst_prediction,
        num_samples_of,
        open_prediction,
        predict_to_store,
        prediction_extras,
        resolve_device,
    )
    from diffst.inference.provenance import prediction_provenance
    from diffst.inference.store import TileStore, store_path
    from diffst.inference.whole_slide import raw_input_record, whole_slide_tiles
    from diffst.io.spatialdata_out import is_diffst_spatialdata, require_spatial, write_prediction_spatialdata
    from diffst.runs import load_run

    if steps is not None:
        _positive(steps, "--steps", 0)
    if samples is not None:
        _positive(samples, "--samples")
    _positive(batch_size, "--batch-size")
    # Only what the user gave overrides the run's sampler settings; --steps 0 means all diffusion steps.
    overrides = {k: v for k, v in (("method", sampler), ("steps", steps), ("num_samples", samples)) if v is not None}
    if overrides.get("steps") == 0:
        overrides["steps"] = None
    metrics_path = out.with_suffix(".metrics.json")
    with _user_errors():
        if out.suffix not in (".h5ad", ".zarr"):
            raise typer.BadParameter(f"--out {out}: give a file name ending in .h5ad (AnnData) or .zarr (SpatialData "
                                     "store).")
        if (data is None) == (input_ is None):
            raise typer.BadParameter("give either --data (a prepared dataset) or --input (a raw sample), not both "
                                     "or neither.")
        spatialdata = out.suffix == ".zarr"
        check_replaceable(out, "prediction", is_diffst_spatialdata if spatialdata else is_diffst_prediction, overwrite)
        evaluate = evaluate and input_ is None  # a whole slide includes training tissue: nothing held out to score
        if evaluate:
            check_replaceable(metrics_path, "metrics file", _is_metrics_file, overwrite)
        if spatialdata:  # a missing optional package is reported before any work, not after sampling
            require_spatial("spatialdata")
        dev = resolve_device(device)
        with contextlib.ExitStack() as stack:
            run, input_record, blend = None, None, "mean"
            if input_ is not None:
                options = {"image": image, "pixel_size_um": pixel_size, "force_pixel_size": force_pixel_size,
                           "image_origin_um": _floats(image_origin, 2, "--image-origin"), "min_qv": min_qv}
                samples = _read_inputs([input_], False, platform, options)
                run = load_run(checkpoint, device=dev)
                # The temporary tiling lives beside the output, so it lands on the same disk and is removed after.
                workdir = out.expanduser().resolve().parent
                workdir.mkdir(parents=True, exist_ok=True)
                input_record = raw_input_record(samples, [input_], {k: v for k, v in options.items() if v})
                tiling = whole_slide_tiles(samples, run, workdir, stride_um=stride, min_tissue_fraction=min_tissue)
                del samples  # the tiling lets them go once the tiles are written: they hold what prediction needs
                data = stack.enter_context(tiling)
                split, blend = "test", "window"
            run, dataset, used, dev = open_prediction(checkpoint, data, split=split, sampler=overrides, device=device,
                                                      run=run)
            k = num_samples_of(run, used)
            check_sample_memory(min(batch_size, len(dataset)), len(dataset.genes), dataset.geometry.tile_hr, k)
            extras = prediction_extras(run, used, seed)
            store = _open_tile_store(TileStore, store_path(out), run, dataset, extras, k, batch_size, dev)
            stack.callback(store.close)  # kept on failure: a rerun resumes from the finished tiles
            try:
                summary = predict_to_store(run, dataset, used, store, batch_size=batch_size, seed=seed, device=dev)
            except KeyboardInterrupt:
                typer.echo(f"{len(store.finished())} finished tiles are kept in {store.path}; run the same command "
                           "again to resume from them.", err=True)
                raise
            if summary["reused"]:
                typer.echo(f"Resumed: {summary['reused']} of {summary['n_tiles']} tiles were already predicted "
                           f"({store.path}); predicted {summary['predicted']}.")
            provenance = prediction_provenance(extras, data, split, dataset.meta, k, input_record=input_record)
            source = StoreTiles(store, k, interval_layer_names() if "intervals" in extras else [])
            if spatialdata:
                written = write_prediction_spatialdata(dataset, source, out, extra_uns=provenance, blend=blend)
                typer.echo(f"Wrote {out}: SpatialData store, {written['n_obs']} HR bins x {written['n_vars']} genes")
            else:
                written = write_h5ad_stream(dataset, source, out, extra_uns=provenance, blend=blend)
                typer.echo(f"Wrote {out}: {written['n_obs']} HR bins x {written['n_vars']} genes")
            for name, seam in written["seams"].items():
                typer.echo(f"  {name}: {len(dataset)} tiles blended; mean |difference| of neighbouring bins across tile "
                           f"edges {seam['seam_mean_abs_diff']:.3f} vs inside tiles {seam['inside_mean_abs_diff']:.3f} "
                           f"(ratio {seam['ratio']:.2f})")
            if evaluate and dataset.has_hr:
                from diffst.atomic import atomic_output
                from diffst.evaluation.report import evaluate_split

                report = evaluate_split(dataset, {"diffst": source.means(len(dataset))})
                with atomic_output(metrics_path, directory=False) as tmp:
                    tmp.write_text(json.dumps(report, indent=2))
                for name, m in report.items():
                    typer.echo(f"  {name:8s} PCC {m['pcc']:.3f}  RMSE(counts) {m['rmse_counts']:.3f}  "
                               f"paper-protocol RMSE {m['paper_rmse']:.3f} |PCC| {m['paper_abs_pcc']:.3f}")
                typer.echo(f"Metrics: {metrics_path}")
            store.remove()  # the output is complete: the finished tiles are no longer needed


def _open_tile_store(store_class, path: Path, run, dataset, extras: dict, k: int, batch_size: int, device):
    """Open the per-tile store of ``diffst predict`` under the identity of everything its tiles depend on."""
    import torch

    import diffst
    from diffst.inference.store import dataset_identity, run_identity

    identity = {"run": run_identity(run), "sampler": extras["sampler"], "seed": extras["seed"], "num_samples": k,
                "batch_size": batch_size, "device": str(getattr(device, "type", device)),
                "diffst_version": diffst.__version__, "torch_version": str(torch.__version__),
                "input": dataset_identity(dataset)}
    return store_class.open(path, identity)


def _is_metrics_file(path: Path) -> bool:
    """Tell whether ``path`` is a metrics JSON that ``diffst predict`` wrote (method -> metrics with a signed PCC)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "bicubic" in report and "pcc" in report["bicubic"]


@app.command()
def plot(
    prediction: Annotated[Path, typer.Argument(help="A prediction .h5ad written by diffst predict or demo.")],
    out: Annotated[Path, typer.Option(help="PNG file to write (an existing file is replaced only if it is a PNG).")] = Path("slide.png"),
    genes: Annotated[str | None, typer.Option(help="Comma-separated genes (rows); default: the 3 most expressed.")] = None,
    sample: Annotated[str | None, typer.Option(help="Sample to draw; default: the first.")] = None,
) -> None:
    """Draw the whole-slide figure of a prediction: histology, LR spots, answer, std, observed (Fig. 3)."""
    import anndata as ad

    from diffst.errors import InputError
    from diffst.plotting.slide import plot_slide

    with _user_errors():
        if not prediction.is_file():
            raise InputError(f"{prediction} does not exist; give the .h5ad that diffst predict wrote.")
        if out.exists() and (out.is_dir() or out.suffix.lower() != ".png"):
            raise InputError(f"{out} exists and is not a PNG figure; choose another --out (nothing is overwritten).")
        try:
            adata = ad.read_h5ad(prediction)
        except Exception as exc:  # h5py / anndata raise many kinds for a damaged file
            raise InputError(f"{prediction} cannot be read as an .h5ad ({type(exc).__name__}); give the file that "
                             "diffst predict wrote.") from None
        names = [g.strip() for g in genes.split(",") if g.strip()] if genes else None
        path = plot_slide(adata, names, out, sample=sample)
    typer.echo(f"Wrote {path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo_output"),
    scale: Annotated[int, typer.Option(help="Super-resolution factor: 5 or 10.")] = 10,
    steps: Annotated[int, typer.Option(help="Training steps of the cpu preset.")] = 2000,
    samples: Annotated[int, typer.Option(help="K samples per tile for mean and std.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the main job on the built-in real Xenium crop: prepare, train, predict, compare, plot."""
    import logging

    from diffst.atomic import check_writable_target
    from diffst.core.geometry import tile_preset
    from diffst.demo import best_baseline, run_demo
    from diffst.inference.predict import resolve_device

    logging.basicConfig(level=logging.WARNING)
    _positive(steps, "--steps")
    _positive(samples, "--samples")
    with _user_errors():
        tile_preset("cpu", scale)
        resolve_device(device)
        check_writable_target(out, "demo output", folder=True)
        report = run_demo(out, scale=scale, steps=steps, num_samples=samples, device=device, seed=seed)
    typer.echo(f"Held-out region, {report['setup']['test_tiles']} tiles, s = {scale}:")
    for label, name in (("bicubic", "bicubic"), ("best baseline", best_baseline(report)), ("Diff-ST", "diffst")):
        m = report[name]
        shown = label if label == name or name == "diffst" else f"{label} ({name})"
        typer.echo(f"  {shown:28s} PCC {m['pcc']:.3f}  RMSE(counts) {m['rmse_counts']:.3f}")
    typer.echo(f"  noise ceiling PCC {report['noise_ceiling']['pcc']:.3f}")
    typer.echo(f"Outputs in {out}: prediction_s{scale}.h5ad, metrics_s{scale}.json, comparison_s{scale}.png, "
               f"slide_s{scale}.png, prepared_s{scale}/preview.png")


@app.command()
def benchmark(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Sample folders/files, read as by diffst prepare.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder: cells/, prepared/, runs/, benchmark.json/.md, figures/.")] = Path("benchmark_output"),
    example: Annotated[bool, typer.Option(help="Use the built-in real Xenium example.")] = False,
    platform: Annotated[str, typer.Option(help="auto, xenium, visium, visium_hd, legacy_st, anndata or "
                                                 "spatialdata (a .zarr store; --image NAME picks its image "
                                                 "element, STORE.zarr/tables/NAME its table).")] = "auto",
    image: Annotated[Path | None, typer.Option(help="Image file, when not found in the sample folder.")] = None,
    pixel_size: Annotated[float | None, typer.Option(help="Image microns per pixel (else from metadata).")] = None,
    image_origin: Annotated[str | None, typer.Option(help="x,y microns of the image's top-left corner (Xenium crops).")] = None,
    preset: Annotated[str, typer.Option(help="Tile geometry preset: cpu or paper.")] = "cpu",
    scales: Annotated[str, typer.Option(help="Comma-separated super-resolution factors, e.g. 5,10.")] = "10",
    folds: Annotated[int, typer.Option(help="Region folds per sample (k >= 2).")] = 4,
    fold_layout: Annotated[str, typer.Option(help="auto, strips (vertical) or grid.")] = "auto",
    methods: Annotated[str, typer.Option(help="Comma-separated methods: training-free bicubic, nearest, ridge, "
                                               "tesla and their +spots forms (bicubic+spots, ...); trained diffst "
                                               "(two-stage), regression (its stage one), unet, unetpp, "
                                               "attention-unet, histogene, guided-dm, diffst-one-stage; ablations "
                                               "diffst-no-cam/-no-graph/-no-hier, regression-no-cam/-no-graph/"
                                               "-no-hier, regression-mse, regression-one-seed (one member of "
                                               "stage one's seed ensemble).")]
    = "bicubic,nearest,ridge,tesla,ridge+spots,diffst",
    budget: Annotated[str, typer.Option(help="Training budget of trained methods: tiny (preset tiny, 8 steps) or "
                                              "full (preset cpu: 2000 diffusion steps; regressions and stage one "
                                              "200).")] = "tiny",
    n_genes: Annotated[int, typer.Option(help="Top-N genes by total counts, fixed for all folds.")] = 25,
    genes: Annotated[str | None, typer.Option(help="Comma-separated gene list (overrides --n-genes).")] = None,
    train_stride: Annotated[float | None, typer.Option(help="Stride (µm) between training tiles; default a tenth of a tile.")] = None,
    min_tissue: Annotated[float, typer.Option(help="Minimum fraction of a tile that shows tissue.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    self_supervised: Annotated[bool, typer.Option(help="Spot-only slides (Visium, legacy ST): HR = the spots, "
                                                       "LR = sums of s x s spots (--scales 2 or 3).")] = False,
    test_sample: Annotated[str | None, typer.Option(help="Sample split instead of region folds: comma-separated "
                                                        "sample names to test on whole (train on the others), "
                                                        "e.g. C3.")] = None,
    tile_lr: Annotated[int | None, typer.Option(help="With --self-supervised: LR blocks per tile side (default: "
                                                     "tiles of about 16 x 16 spots).")] = None,
    members: Annotated[int, typer.Option(help="Seeds (members) of the stage-one ensemble of diffst, regression and "
                                              "their ablations (as diffst train --two-stage).")] = STAGE_ONE_MEMBERS,
) -> None:
    """Benchmark Diff-ST against baselines on held-out tissue (region folds, or a sample split; resumable)."""
    import logging

    from diffst.atomic import check_writable_target
    from diffst.benchmark.methods import BUDGETS, parse_methods
    from diffst.benchmark.run import run_benchmark
    from diffst.core.geometry import tile_preset
    from diffst.inference.predict import resolve_device

    logging.basicConfig(level=logging.WARNING)
    _positive(folds, "--folds", 2)
    _positive(n_genes, "--n-genes")
    _positive(members, "--members")
    with _user_errors():
        try:
            scale_list = list(dict.fromkeys(int(v) for v in scales.split(",") if v.strip()))
        except ValueError:
            scale_list = []
        if not scale_list:
            raise typer.BadParameter(f"--scales needs comma-separated integers such as 5,10, got '{scales}'.")
        if tile_lr is not None and not self_supervised:
            raise typer.BadParameter("--tile-lr sets the tiles of the --self-supervised mode; the other presets' "
                                     "tiles come from --preset.")
        if not self_supervised:
            for scale in scale_list:
                tile_preset(preset, scale)
        if budget not in BUDGETS:
            raise typer.BadParameter(f"Unknown --budget '{budget}'; choose one of {list(BUDGETS)}.")
        if fold_layout not in ("auto", "strips", "grid"):
            raise typer.BadParameter(f"Unknown --fold-layout '{fold_layout}'; choose auto, strips or grid.")
        method_list = parse_methods(methods)
        device = str(resolve_device(device))
        check_writable_target(out, "benchmark output", folder=True)
        samples = _read_inputs(inputs or [], example, platform, {
            "image": image, "pixel_size_um": pixel_size, "image_origin_um": _floats(image_origin, 2, "--image-origin")})
        gene_list = [g.strip() for g in genes.split(",") if g.strip()] if genes else None
        result = run_benchmark(samples, out, preset=preset, scales=scale_list, k=folds, layout=fold_layout,
                               methods=method_list, budget=budget, n_genes=n_genes, genes=gene_list,
                               train_stride_um=train_stride, min_tissue=min_tissue, seed=seed, device=device,
                               self_supervised=self_supervised, tile_lr=tile_lr, members=members,
                               test_samples=[t.strip() for t in test_sample.split(",") if t.strip()] if test_sample else None)
    for key, entry in result["summary"].items():
        typer.echo(f"{key}: {entry['n_folds']} folds ({entry['n_folds_skipped']} skipped)")
        for name, row in entry["methods"].items():
            lo, hi = row["pcc_ci"]
            typer.echo(f"  {name:16s} PCC {row['pcc']:.3f} [{lo:.3f}, {hi:.3f}]  RMSE(counts) {row['rmse_counts']:.3f}")
        if "ceiling" in entry:
            typer.echo(f"  noise ceiling    PCC {entry['ceiling']['pcc']:.3f}")
    typer.echo(f"Outputs in {out}: benchmark.json, benchmark.md, figures/, cells/")


def main() -> None:  # pragma: no cover - console entry
    """Run the ``diffst`` command (the console script's entry point)."""
    import os

    # With OpenMP's default busy-waiting, a torch process sharing a small CPU with any other busy process
    # slows down by 20-50x (measured here: 0.3 s -> 18 s per training step on 2 cores). Passive waiting
    # avoids that at little cost; it only takes effect if set before torch loads (every command imports
    # torch lazily, after this), and a user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
