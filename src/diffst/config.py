"""Typed run configuration: one validated object describing a training run, loaded from YAML.

A run configuration has the sections ``data``, ``model``, ``diffusion``, ``train`` and ``sampler`` plus
``seed``, ``device`` and ``run_dir``. Every section rejects unknown keys, so a typo fails with a message
naming the key. The ``model`` section is a model preset name plus overrides of any
:class:`~diffst.models.config.ModelConfig` field; :func:`resolve_config` turns it into the full model
configuration (taking ``n_genes`` and ``image_channels`` from the prepared dataset) and makes paths
absolute. The *resolved* configuration is the one saved with a run and inside every checkpoint; loading
it again and resolving it gives the same object.

Run presets are packaged YAML files (``src/diffst/presets/<name>.yaml``: ``cpu``, ``paper``, ``tiny``). A
configuration that says ``preset: NAME`` at top level starts from that file and overrides its keys
(sections merge key by key; giving ``train.steps`` replaces the preset's ``train.epochs`` and vice versa).

Example
-------
.. code-block:: yaml

    preset: cpu
    data: {path: prepared/xenium_cpu5, example: null}
    train: {steps: 4000, ema_decay: 0.999}
    run_dir: runs/xenium_cpu
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffst.atomic import atomic_output
from diffst.diffusion.config import DiffusionConfig, SamplerConfig
from diffst.errors import InputError
from diffst.models.config import ModelConfig, model_preset

__all__ = [
    "ExampleDataConfig",
    "DataConfig",
    "ModelSpec",
    "TrainConfig",
    "RunConfig",
    "ConfigError",
    "load_config",
    "parse_config",
    "resolve_config",
    "save_config",
    "apply_overrides",
    "preset_names",
    "read_preset",
]


class ConfigError(InputError):
    """A run configuration file or value is invalid; the message names the offending key."""


def _expand_home(path: str) -> str:
    return str(Path(path).expanduser())


class ExampleDataConfig(BaseModel):
    """How to prepare the built-in Xenium example when ``data.path`` does not hold a prepared dataset yet.

    Training itself never prepares data: the commands (``diffst train``, ``diffst demo``,
    ``python -m diffst.training``) call :func:`diffst.example.prepare_example_data` first. Every field is
    required; the ``cpu`` preset holds the values of the built-in runs.

    Attributes
    ----------
    preset
        Tile geometry preset of :func:`diffst.core.geometry.tile_preset` (``"cpu"`` or ``"paper"``).
    scale
        Super-resolution factor (LR bin / HR bin).
    n_genes
        Number of top genes kept.
    train_stride_um
        Stride between training tiles in µm (overlapping tiles give more training data).
    """

    model_config = ConfigDict(extra="forbid")

    preset: str
    scale: int = Field(ge=1)
    n_genes: int = Field(ge=1)
    train_stride_um: float | None = Field(gt=0)


class DataConfig(BaseModel):
    """Where the training tiles come from and how they are batched.

    Attributes
    ----------
    path
        Folder of a prepared dataset (``diffst prepare`` / :func:`diffst.data.prepare.prepare_dataset`);
        ``~`` is expanded.
    train_split, val_split
        Split names. Validation uses ``val_split`` when the dataset has it; the test split is never used
        for validation or model selection (it is rejected here).
    augment
        Random square symmetries (flips and 90-degree turns) of training tiles. The draw is a deterministic
        function of (seed, epoch, tile), so an interrupted run resumes with identical augmentations.
    batch_size
        Tiles per step *per process*; the effective batch is ``batch_size * world_size``.
    num_workers
        DataLoader worker processes (0 loads in the main process).
    subset
        Optional list of training-tile indices to train on (e.g. ``[0]`` to overfit one tile).
    example
        If given and ``path`` is absent or an empty folder, the commands prepare the built-in example
        there before training (see :class:`ExampleDataConfig`).
    holdout_fraction
        When the dataset has no validation split: hold this share of the training tissue out of the loss
        (squares one LR spot wide, :func:`diffst.data.holdout.holdout_bins`) and validate on it, so that
        ``train.keep_best`` can select a checkpoint on data it did not fit. 0 (the default) turns it off.
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    train_split: Literal["train", "val", "test"] = "train"
    val_split: Literal["train", "val", "test"] | None = "val"
    augment: bool = True
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(0, ge=0)
    subset: list[int] | None = None
    example: ExampleDataConfig | None = None
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0)

    _home = field_validator("path")(_expand_home)

    @model_validator(mode="after")
    def _no_test_for_training(self) -> DataConfig:
        if self.train_split == "test" or self.val_split == "test":
            raise ValueError(
                "the test split may not be used for training or validation (model selection on test data "
                "biases the evaluation); use 'train' and 'val'"
            )
        if self.val_split == self.train_split:
            raise ValueError(f"val_split={self.val_split!r} equals train_split; use a held-out split or null")
        if self.subset is not None and (not self.subset or min(self.subset) < 0):
            raise ValueError(f"subset must be a non-empty list of tile indices >= 0, got {self.subset}")
        return self


_MODEL_FIELDS = set(ModelConfig.model_fields)


class ModelSpec(BaseModel):
    """The denoiser: a preset plus overrides of any :class:`~diffst.models.config.ModelConfig` field.

    ``preset: cpu`` or ``preset: paper`` starts from :func:`~diffst.models.config.model_preset`;
    ``preset: null`` starts from the ``ModelConfig`` defaults. ``n_genes`` and ``image_channels`` are
    taken from the dataset when not given (and checked against it when given). ``learn_sigma`` is not a
    model setting here: it follows ``diffusion.learn_sigma``. A resolved spec has ``preset: null`` and
    lists every other field.
    """

    model_config = ConfigDict(extra="allow")

    preset: Literal["paper", "cpu"] | None = "cpu"

    @model_validator(mode="after")
    def _check_overrides(self) -> ModelSpec:
        if "learn_sigma" in self.overrides:
            raise ValueError("learn_sigma is set by diffusion.learn_sigma (the model's output channels follow it); "
                             "remove it from the model section")
        unknown = sorted(set(self.overrides) - _MODEL_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown model field(s) {unknown}; valid fields are 'preset' and {sorted(_MODEL_FIELDS)}"
            )
        # Validate the values now, so a bad one fails at load time with its name.
        try:
            self.build()
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'model'}: {e['msg']} (got {e.get('input')!r})"
                for e in exc.errors()
            )
            raise ValueError(problems) from None
        return self

    @property
    def overrides(self) -> dict[str, Any]:
        """The ModelConfig fields given explicitly."""
        return dict(self.model_extra or {})

    def build(self, n_genes: int | None = None, image_channels: int | None = None,
              learn_sigma: bool = True) -> ModelConfig:
        """Build the ModelConfig this spec describes.

        Parameters
        ----------
        n_genes, image_channels
            Of the dataset (None: the spec's value or the preset's default).
        learn_sigma
            ``diffusion.learn_sigma``: the model predicts 2N channels when True, N otherwise.

        Returns
        -------
        ModelConfig
        """
        values = {**self.overrides, "learn_sigma": learn_sigma}
        for key, actual in (("n_genes", n_genes), ("image_channels", image_channels)):
            if actual is None:
                continue
            given = values.get(key)
            if given is not None and int(given) != int(actual):
                raise ConfigError(f"model.{key}={given} but the dataset has {actual}; remove model.{key} or fix it")
            values[key] = actual
        if self.preset is None:
            return ModelConfig(**values)
        return model_preset(
            self.preset,
            n_genes=values.pop("n_genes", 25),
            image_channels=values.pop("image_channels", 3),
            **values,
        )


class TrainConfig(BaseModel):
    """Optimisation, logging and checkpointing.

    Attributes
    ----------
    objective
        ``"diffusion"`` (the paper: denoise noisy HR maps) or ``"regression"`` (the model is called with
        x_t = 0 at t = 0 and predicts the HR maps directly; a baseline, or the first stage of a two-stage
        run). Both share the data order, augmentation, EMA, checkpoints, resume and data parallelism.
    regression
        What a regression run predicts and its loss. ``"mse"``: the diffusion target, MSE in model space.
        ``"spot_poisson"``: log-weights of the HR bins inside each LR spot; each spot's measured count is
        shared out over its bins by a softmax (the output is spot-consistent by construction) around a
        prior that follows the interpolated LR maps; Poisson deviance of the HR counts, each gene weighted
        by its inverse mean count so that every gene counts alike. Read by regression runs only.
    linear_prior
        ``spot_poisson`` regressions only: start from a per-gene ridge regression of log1p counts on the
        interpolated LR and per-bin image statistics (and their products), fitted in closed form on the
        training tiles before the first step and kept fixed; the network learns log-weights around it
        (:class:`~diffst.models.spot_ratio.LinearPrior`).
    spot_ratio_shrink
        ``spot_poisson`` regressions only: the run answers ``(1 - shrink) * its allocation + shrink * the
        allocation of the LR counts interpolated in counts`` (:func:`diffst.runs.regression_point`); training
        is unchanged. A network trained on one tissue can put most of a spot's counts into one of its bins,
        in every seed and view alike, on tissue unlike it. Measured with one seed (the same networks) on
        HER2ST's region folds / C2 -> C3 and the Xenium folds at 5x / 10x, PCC: 0 (the answer alone, as runs
        saved before this field existed) 0.582 / 0.747 / 0.547 / 0.457, 0.25 0.611 / 0.759 / 0.562 / 0.463,
        0.5 0.637 / 0.762 / 0.572 / 0.459, 0.75 0.653 / 0.753 / 0.571 / 0.431; RMSE of 0.5 against 0:
        29.3 / 25.8 / 2.14 / 2.43 against 38.0 / 28.2 / 2.24 / 2.51. Half and half (the default) is the
        only one measured that is better than 0 everywhere in both.
    steps, epochs
        Length of training: exactly one of them (an epoch is one pass over the training tiles, sharded
        over the processes).
    lr, betas, eps, weight_decay
        AdamW settings (paper: 1e-4, (0.9, 0.999), 1e-8, 1e-5).
    grad_clip
        Maximum global gradient norm (``null``: no clipping).
    ema_decay
        Decay of the exponential moving average of the weights (paper / guided-diffusion: 0.9999; use
        e.g. 0.99-0.999 for runs of a few thousand steps).
    ema_warmup
        Use ``min(ema_decay, (1 + n) / (10 + n))`` at update n, so the average is useful early on.
    disentangle_weight
        Weight of the model's disentangling loss (paper code: 0.01).
    curriculum
        Curriculum patch selection: the entropy threshold gamma rises with training progress.
    curriculum_milestones, curriculum_quantiles
        Schedule of gamma (see :func:`diffst.core.curriculum.curriculum_threshold`).
    mixed_precision
        ``"no"``, ``"fp16"`` or ``"bf16"`` (passed to Accelerate).
    log_every
        Steps between progress-bar / TensorBoard updates (the metrics CSV gets every step).
    val_every
        Steps between validation passes (also run at the end); 0 disables validation.
    val_batches
        Maximum number of validation batches per pass (``null``: the whole split).
    keep_best
        Model selection on the validation split: after every validation pass whose loss (EMA weights) is
        the lowest so far, that checkpoint is also kept under ``<run_dir>/best/``, and a run folder then
        stands for it (:func:`diffst.runs.find_checkpoint`). Needs a validation split and ``val_every``.
    patience
        With ``keep_best``: stop early after this many validation passes without a new lowest loss
        (0: train to the end).
    checkpoint_every
        Steps between checkpoints (a final one is always written).
    keep_last
        Number of most recent checkpoints kept on disk.
    tensorboard
        Also write TensorBoard events when ``tensorboard`` is installed.
    find_unused_parameters
        Passed to DistributedDataParallel (needed only if some weights get no gradient).
    base_run
        A finished regression run (run folder or checkpoint folder) whose frozen prediction the diffusion
        refines, or a list of them: a seed ensemble (the same regression trained with other seeds), whose
        mean answer is refined. Required by ``diffusion.target: regression_residual`` and used by no other
        target. Its checkpoints (path and step) are recorded in every checkpoint of this run, which
        inference reads.
    """

    model_config = ConfigDict(extra="forbid")

    objective: Literal["diffusion", "regression"] = "diffusion"
    regression: Literal["mse", "spot_poisson"] = "mse"
    linear_prior: bool = False
    spot_ratio_shrink: float = Field(0.5, ge=0, le=1)
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = False
    disentangle_weight: float = Field(0.01, ge=0)
    curriculum: bool = True
    curriculum_milestones: tuple[float, ...] = (0.25, 0.5)
    curriculum_quantiles: tuple[float, ...] = (0.0, 0.5, 0.75)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = Field(10, ge=1)
    val_every: int = Field(500, ge=0)
    val_batches: int | None = Field(None, ge=1)
    keep_best: bool = False
    patience: int = Field(0, ge=0)
    checkpoint_every: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    tensorboard: bool = True
    find_unused_parameters: bool = False
    base_run: str | list[str] | None = None

    @field_validator("base_run")
    @classmethod
    def _base_home(cls, path: str | list[str] | None) -> str | list[str] | None:
        if isinstance(path, list):
            if not path:
                raise ValueError("base_run is an empty list; name at least one finished regression run")
            return [_expand_home(p) for p in path]
        return None if path is None else _expand_home(path)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of steps or epochs (got steps={self.steps}, epochs={self.epochs})")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.keep_best and not self.val_every:
            raise ValueError("train.keep_best selects by validation loss: set train.val_every > 0")
        if self.patience and not self.keep_best:
            raise ValueError("train.patience stops on the validation loss that train.keep_best tracks: set keep_best")
        if len(self.curriculum_quantiles) != len(self.curriculum_milestones) + 1:
            raise ValueError("curriculum_quantiles needs exactly one more entry than curriculum_milestones")
        return self


class RunConfig(BaseModel):
    """Everything that defines a training run.

    Attributes
    ----------
    data, model, diffusion, train, sampler
        The sections (see :class:`DataConfig`, :class:`ModelSpec`, ``DiffusionConfig``,
        :class:`TrainConfig`, ``SamplerConfig``; the sampler is used by inference and validation previews).
    seed
        Seeds weights, data order, augmentation, timesteps and noise (per process, reproducibly).
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    run_dir
        Folder for the resolved config, metrics, logs and checkpoints (``~`` is expanded).
    """

    model_config = ConfigDict(extra="forbid")

    data: DataConfig
    model: ModelSpec = Field(default_factory=ModelSpec)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig
    sampler: SamplerConfig = Field(default_factory=lambda: SamplerConfig(method="ddpm", steps=20))
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_dir: str

    _home = field_validator("run_dir")(_expand_home)

    @model_validator(mode="after")
    def _base_run_with_its_target(self) -> RunConfig:
        two_stage = self.diffusion.target == "regression_residual"
        if two_stage and self.train.base_run is None:
            raise ValueError("diffusion.target: regression_residual needs train.base_run: the folder of a finished "
                             "regression run (train.objective: regression)")
        if not two_stage and self.train.base_run is not None:
            raise ValueError(f"train.base_run is only used with diffusion.target: regression_residual, not "
                             f"{self.diffusion.target!r}; remove it or set that target")
        return self

    def model_config_resolved(self) -> ModelConfig:
        """Return the full ModelConfig of a resolved run configuration (see :func:`resolve_config`)."""
        return self.model.build(learn_sigma=self.diffusion.learn_sigma)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict (model overrides inlined into ``model``)."""
        return json.loads(self.model_dump_json())


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        value = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def preset_names() -> list[str]:
    """List the packaged run presets.

    Returns
    -------
    list of str
        The names of ``src/diffst/presets/*.yaml``, sorted.
    """
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("diffst").joinpath("presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    """Read the raw dict of a packaged run preset.

    Parameters
    ----------
    name
        ``"cpu"``, ``"paper"``, ``"tiny"`` or another name of :func:`preset_names`.

    Returns
    -------
    dict
        The sections of ``src/diffst/presets/<name>.yaml``, not validated (a preset need not give
        ``data.path`` or ``run_dir``).

    Raises
    ------
    ConfigError
        If there is no such preset (the message lists the ones there are).
    """
    if not isinstance(name, str) or name not in preset_names():
        raise ConfigError(f"preset: unknown run preset {name!r}; choose one of {preset_names()}")
    return yaml.safe_load(resources.files("diffst").joinpath("presets", f"{name}.yaml").read_text())


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _expand_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Expand a top-level ``preset`` (if any): the preset, overridden by the rest of ``data``."""
    if "preset" not in data:
        return data
    data = dict(data)
    base = read_preset(data.pop("preset"))
    train = data.get("train")
    if isinstance(train, dict) and isinstance(base.get("train"), dict):
        # steps and epochs are alternatives: the one the configuration gives replaces the preset's.
        for given, other in (("steps", "epochs"), ("epochs", "steps")):
            if given in train and other not in train:
                base["train"].pop(other, None)
    return _merge(base, data)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain dict as a :class:`RunConfig`; errors name every bad key and value.

    Parameters
    ----------
    data
        The sections. A top-level ``preset: NAME`` starts from the packaged preset ``NAME``
        (:func:`read_preset`) and overrides it with the rest of ``data``.
    source
        Where the dict comes from (named in error messages).

    Returns
    -------
    RunConfig

    Raises
    ------
    ConfigError
        With one line per problem, e.g. ``train.lr: Input should be greater than 0 (got -1)``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping of sections, got {type(data).__name__}")
    data = _expand_preset(data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    except (ValueError, TypeError) as exc:  # raised by a nested build (e.g. model_preset)
        raise ConfigError(f"invalid configuration in {source}: {exc}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``"section.key=value"`` overrides (values parsed as YAML) to a raw config dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run configuration from a YAML (or JSON) file.

    Parameters
    ----------
    path
        The file; a top-level ``preset: NAME`` in it starts from a packaged preset (see :func:`parse_config`).
    overrides
        Optional ``"section.key=value"`` strings applied on top of the file (e.g. ``"train.steps=10"``).

    Returns
    -------
    RunConfig

    Raises
    ------
    ConfigError
        If the file is missing, not valid YAML, or has unknown keys or bad values (each named).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a YAML text file ({exc}); give the run configuration (.yaml)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if isinstance(data, dict):
        apply_overrides(data, overrides)
    return parse_config(data, str(path))


def resolve_config(cfg: RunConfig, n_genes: int, image_channels: int) -> RunConfig:
    """Make the configuration of a run on a dataset with ``n_genes`` and ``image_channels`` fully explicit.

    The model preset is expanded into every ``ModelConfig`` field but ``learn_sigma`` (``preset: null``;
    ``learn_sigma`` stays in the diffusion section), and ``data.path`` / ``run_dir`` become absolute.
    Resolving a resolved configuration returns an equal one.

    Parameters
    ----------
    cfg
        The configuration as loaded.
    n_genes, image_channels
        Of the prepared dataset.

    Returns
    -------
    RunConfig
        The resolved configuration (what a run saves as ``config.yaml``).
    """
    model_cfg = cfg.model.build(n_genes=n_genes, image_channels=image_channels)
    data = cfg.to_dict()
    data["model"] = {"preset": None, **json.loads(model_cfg.model_dump_json(exclude={"learn_sigma"}))}
    data["data"]["path"] = str(Path(cfg.data.path).expanduser().resolve())
    data["run_dir"] = str(Path(cfg.run_dir).expanduser().resolve())
    base = cfg.train.base_run
    if base is not None:
        resolved = [str(Path(p).expanduser().resolve()) for p in (base if isinstance(base, list) else [base])]
        data["train"]["base_run"] = resolved if isinstance(base, list) else resolved[0]
    return parse_config(data, "<resolved config>")


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` to ``path``, atomically (a temporary file beside it, renamed into place).

    Parameters
    ----------
    cfg
        The configuration.
    path
        The file: YAML for ``.yaml`` / ``.yml``, JSON otherwise.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    data = cfg.to_dict()
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2)
    with atomic_output(path, directory=False) as tmp:
        tmp.write_text(text)
    return path
