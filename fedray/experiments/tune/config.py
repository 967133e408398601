"""A sweep's config: the schema of a sweep YAML, its search space over the base experiment's
dotted fields, and loading it, so a bad searched value fails here, naming its field, rather
than in a trial an hour in."""

from __future__ import annotations

import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedray.config import (
    ConfigError,
    ExperimentConfig,
    format_validation_error,
    load_config,
    parse_override,
)


class SweepError(ConfigError):
    """A sweep config or folder that cannot be used; the message names the field or path."""


# What every round reports to Tune besides `round` and `run_dir`: the global validation
# metrics (the coordinator's summary), the hospitals' mean training loss and the largest epsilon.
VAL_KEYS = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc_macro",
            "kappa")
METRICS = tuple(f"val_{k}" for k in VAL_KEYS) + ("train_loss",)
# What a sweep may rank trials on: a validation metric, which the run's final evaluation of its
# saved model (the round of lowest validation loss) reports too, as final_val_*.
RANKED = tuple(f"val_{k}" for k in VAL_KEYS)
FINAL_KEYS = VAL_KEYS

# Fields that change the shards (split, partition, source): trials share one set of shards
# unless the space touches one of these. Fields fixed for the whole sweep: the placement.
SHARD_FIELDS = ("seed", "federation.hospitals", "data.source", "data.path", "data.synth",
                "data.split", "data.partition", "data.include_segmented", "data.skip_bad",
                "data.max_file_mb")
FIXED_FIELDS = ("federation.hospitals", "runtime")
# Fields holding paths: a relative value is the launcher's, made absolute when the sweep loads
# (trials run in folders of their own).
PATH_FIELDS = ("data.path", "model.weights_dir")

BASE_FILE, SWEEP_FILE = "base.yaml", "sweep.yaml"


# ---------------------------------------------------------------- the sweep config

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class Dimension(_Strict):
    """One searched field: exactly one of grid (every value), choice (sampled), uniform,
    loguniform or randint (both ends included)."""

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got "
                             f"{', '.join(given) or 'none'})")
        if self.kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, self.kind)
            if low > high or (low == high and self.kind != "randint"):
                raise ValueError(f"{self.kind}: the low end must be below the high end, "
                                 f"got [{low}, {high}]")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: both ends must be > 0, got [{low}, {high}]")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def extremes(self) -> list[Any]:
        """Every value of a list, the two ends of a range: what the sweep validates up front."""
        return list(getattr(self, self.kind))


class AshaConfig(_Strict):
    """Asynchronous successive halving over rounds: at each rung a trial below the cut stops."""

    enabled: bool = True
    grace_period: int = Field(1, ge=1, description="rounds every trial runs before it can stop")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="None: the sweep's largest federation.rounds")


class SweepConfig(_Strict):
    name: str = "sweep"
    base: Path = Field(description="experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="dotted field: value, applied to the base")
    space: dict[str, Dimension] = Field(min_length=1, description="dotted field: dimension")
    search: Literal["random", "grid", "optuna"] = "random"
    seed: int = 0
    num_samples: int = Field(1, ge=1, description="random/optuna: trials; grid: repeats")
    max_concurrent_trials: int | None = Field(None, ge=1)
    metric: str = "val_balanced_accuracy"
    mode: Literal["max", "min"] = "max"
    asha: AshaConfig = AshaConfig()
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    storage: str = Field("sweeps", description="local folder (relative: to the working "
                                               "directory) or a pyarrow URI such as s3://...")

    @model_validator(mode="after")
    def _searchable(self) -> SweepConfig:
        if self.metric not in RANKED:
            raise ValueError(f"metric {self.metric!r} is not reported as a validation metric; "
                             f"choose one of {', '.join(RANKED)}")
        for key, dim in self.space.items():
            fixed = next((f for f in FIXED_FIELDS if _under(key, f)), None)
            if fixed:
                raise ValueError(f"space.{key}: {fixed} fixes each trial's placement group, "
                                 "so it is the same for the whole sweep; set it in overrides")
            if self.search == "grid" and not dim.discrete:
                raise ValueError(f"space.{key}: search grid takes grid or choice lists, not "
                                 f"{dim.kind}")
            if self.search == "optuna" and dim.kind == "grid":
                raise ValueError(f"space.{key}: search optuna samples; use choice, not grid")
        return self


def _under(key: str, field: str) -> bool:
    return key == field or key.startswith(field + ".")


@dataclass
class Sweep:
    """A validated sweep: its config and the resolved base experiment every trial starts from."""

    config: SweepConfig
    base: ExperimentConfig

    @property
    def base_yaml(self) -> str:
        return self.base.to_yaml()

    def max_rounds(self) -> int:
        dim = self.config.space.get("federation.rounds")
        return max(dim.extremes()) if dim else self.base.federation.rounds

    def shares_shards(self) -> bool:
        """Trials train on the same shards unless the space changes how they are made."""
        return not any(_under(k, f) for k in self.config.space for f in SHARD_FIELDS)


def _plain(value: Any) -> Any:
    """A Python value for the config: Tune's samplers give numpy scalars."""
    return value.item() if hasattr(value, "item") else value


def _override(key: str, value: Any) -> str:
    """`key=value` as `--set` would write it (YAML), for messages: 1e-05, 'on'."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 30).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SweepError(f"sweep config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping")
    return raw


def load_sweep(path: Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep YAML, apply `--set` overrides to its base, and validate every searched
    value (each list item, both ends of each range) as part of the base experiment, so a bad
    value fails here, naming its field, rather than in a trial an hour in."""
    path = Path(path)
    try:
        config = SweepConfig.model_validate(_read_yaml(path))
    except ValidationError as err:
        raise SweepError(format_validation_error(err, f"invalid sweep config ({path})",
                                                 "see configs/sweep-demo.yaml")) from None
    base_path = config.base if config.base.is_absolute() else path.parent / config.base
    if not base_path.is_file():
        raise SweepError(f"{path}: base: {base_path} not found (relative to the sweep file)")
    config.base = base_path.resolve()
    _check_space_types(path, config)
    for item in overrides or []:
        keys, value = parse_override(item)
        config.overrides = {**config.overrides, ".".join(keys): value}
    sets = dict(config.overrides)
    base = _absolute_paths(load_config(config.base, sets))
    if not base.data.split.val > 0:
        raise SweepError("a sweep ranks trials on validation metrics: the base's "
                         "data.split.val must be > 0")
    for key, dim in config.space.items():
        for value in dim.extremes():
            try:
                load_config(config.base, {**sets, key: _plain(value)})
            except ConfigError as exc:
                raise SweepError(f"{path}: space.{key}: {value!r} does not make a valid "
                                 f"experiment:\n{exc}") from None
    _check_backbones(config, base)
    sweep = Sweep(config, base)
    asha = config.asha
    if asha.enabled and asha.grace_period > (asha.max_t or sweep.max_rounds()):
        raise SweepError(f"{path}: asha.grace_period ({asha.grace_period}) exceeds the rounds a "
                         f"trial runs ({asha.max_t or sweep.max_rounds()})")
    if config.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise SweepError(f"{path}: search: optuna needs the optuna package, which is not "
                         "installed (pip install optuna); or use search: random or grid")
    return sweep


def _absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Trials run in folders of their own: relative data and weight paths are the launcher's."""
    if config.data.path is not None and not config.data.path.is_absolute():
        config.data.path = config.data.path.expanduser().resolve()
    if config.model.weights_dir is not None and not config.model.weights_dir.is_absolute():
        config.model.weights_dir = config.model.weights_dir.expanduser().resolve()
    return config


def _absolute(value: Any) -> Any:
    return value if value is None else str(Path(str(value)).expanduser().resolve())


def _field_type(key: str) -> Any:
    """The annotation of the experiment field at a dotted key (None: no such field)."""
    model: Any = ExperimentConfig
    annotation = None
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        model = annotation = fields[part].annotation
    return annotation


def _check_space_types(path: Path, config: SweepConfig) -> None:
    """Path values become absolute, as the base's do; a continuous range on a whole-number
    field is refused: its ends may be whole, but the values sampled between them are not."""
    for key, dim in config.space.items():
        if key in PATH_FIELDS and dim.discrete:
            setattr(dim, dim.kind, [_absolute(v) for v in getattr(dim, dim.kind)])
        annotation = _field_type(key)
        types = set(typing.get_args(annotation)) or {annotation}
        if not dim.discrete and dim.kind != "randint" and int in types and float not in types:
            raise SweepError(f"{path}: space.{key}: takes whole numbers, but {dim.kind} samples "
                             "fractions; use randint [low, high] or a grid / choice list")


def _check_backbones(config: SweepConfig, base: ExperimentConfig) -> None:
    from fedray.models import BACKBONES, available_backbones

    dim = config.space.get("model.backbone")
    names = dim.extremes() if dim else [base.model.backbone]
    usable = available_backbones()
    for name in names:
        if name not in usable:
            where = "space.model.backbone" if dim else "model.backbone"
            hint = " (its library is not installed)" if name in BACKBONES else ""
            raise SweepError(f"{where}: {name!r} is not a usable backbone{hint}; the registry "
                             f"has {', '.join(usable)}")

