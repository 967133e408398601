"""Typed experiment configuration: YAML in, validated models out, with dotted overrides.

Every component owns its defaults here; a bad value fails once, at load time, with the
field's dotted path. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Strict):
    """The embedded synthetic smear dataset used when no real data is given."""

    n: int = Field(2000, ge=8)
    size: int = Field(64, ge=16, le=1024)
    patients_per_class: int = Field(20, ge=1)


class SplitConfig(_Strict):
    """Train/val/test fractions; the split happens before any augmentation."""

    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    group_aware: bool = True
    fold: int = Field(0, ge=0, description="with folds: which fold is the local test split")
    folds: int | None = Field(None, ge=2, description="k-fold split at each site (cv)")
    seed: int | None = Field(None, description="the split's own seed (default: the experiment "
                             "seed); fixed, runs of other seeds keep the same test patients")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} is not below folds {self.folds}")
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must equal 1.0, got {total:.4f}")
        return self


class PartitionConfig(_Strict):
    """How the training split is divided among hospitals."""

    scheme: Literal["iid", "dirichlet", "by-group"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (label skew)")
    min_per_hospital: int = Field(8, ge=1)
    group_column: str = Field("site", description="column naming each row's site, for by-group")


class SiteConfig(_Strict):
    """One hospital's own data folder, on its own node; read only by that hospital."""

    path: Path = Field(..., description="image folder (any recognised layout) or a prepared "
                                        "folder, on the hospital's node")
    state_dir: Path | None = Field(
        None, description="where the hospital keeps its optimizer state, ledger and local model, "
                          "one subfolder per run (<state_dir>/<run folder name>); default: "
                          ".fedray-state inside its site folder")


class DataConfig(_Strict):
    source: Literal["synth", "folder", "prepared", "sites"] = "synth"
    sites: dict[str, SiteConfig] = Field(
        default_factory=dict, description="source sites: hospital name -> its site folder")
    cross_site_duplicates: bool = Field(
        False, description="sites exchange the sha256 of their images (never the images) and "
                           "the coordinator reports duplicates across sites")
    central_test: Path | None = Field(
        None, description="an optional held-out folder evaluated centrally by the coordinator "
                          "(an external cohort)")
    path: Path | None = Field(None, description="image folder (folder) or prepared dir (prepared)")
    include_segmented: bool = False
    skip_bad: bool = False
    max_file_mb: float = Field(64.0, gt=0, allow_inf_nan=False,
                               description="per-file size cap of the folder scan, MiB")
    synth: SynthConfig = SynthConfig()
    image_size: int | None = Field(None, ge=16, description="model input size; None = backbone's")
    split: SplitConfig = SplitConfig()
    partition: PartitionConfig = PartitionConfig()
    augment: bool = True
    flip_x4: bool = Field(False, description="offline x4 flip expansion, training rows only")

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source == "sites":
            if not self.sites:
                raise ValueError("data.sites is required when data.source is 'sites' "
                                 "(hospital name -> {path: DIR})")
            return self
        if self.sites:
            raise ValueError(f"data.sites is only read when data.source is 'sites' "
                             f"(data.source is '{self.source}')")
        if self.source != "synth" and self.path is None:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class ModelConfig(_Strict):
    backbone: str = "smallcnn"
    pretrained: bool = False
    freeze: bool = False
    dp_safe: bool = False
    dropout: float = Field(0.2, ge=0, lt=1)
    weights_dir: Path | None = None


class PlateauConfig(_Strict):
    """ReduceLROnPlateau on the global validation loss, stepped once per round."""

    factor: float = Field(0.2, gt=0, lt=1)
    patience: int = Field(5, ge=0)
    min_lr: float = Field(1e-6, ge=0)


class TrainingConfig(_Strict):
    """One training recipe for every backbone, in every hospital."""

    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    class_weighted: bool = True
    plateau: PlateauConfig = PlateauConfig()
    early_stopping_patience: int | None = Field(10, ge=1)
    amp: bool = True
    channels_last: bool = True
    eval_batch_size: int = Field(128, ge=1)


class PrivacyOverride(_Strict):
    """Per-hospital exceptions to the run-wide DP settings (None keeps the run's value)."""

    noise_multiplier: float | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    budget: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)


class PrivacyConfig(_Strict):
    """Sample-level DP-SGD in every hospital (Opacus), with one ledger per hospital per run."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    target_epsilon: float | None = Field(
        None, gt=0, description="solve the noise for the planned rounds x local epochs")
    budget: float | None = Field(
        None, gt=0, description="epsilon at which a hospital stops; default target_epsilon")
    delta: float | None = Field(None, gt=0, lt=1, description="default 0.1 / shard size")
    accountant: Literal["rdp", "prv"] = "rdp"
    poisson_sampling: bool = True
    secure_mode: bool = False
    grad_sample_mode: Literal["hooks", "functorch", "ew", "ghost", "bk"] = "bk"
    unit: Literal["image", "patient", "record"] = Field(
        "image", description="what one (epsilon, delta) protects: a source image (its flip_x4 "
                             "copies together), a patient (the data's group column), a record")
    reproducible_noise: bool = Field(
        False, description="debugging only: seed the DP noise and sampling from the config, "
                           "which voids the epsilon guarantee (every output says so)")
    share_local_metrics: bool | None = Field(
        None, description="send un-noised local loss/accuracy/class counts to the coordinator; "
                          "default: off under DP, on otherwise")
    hospitals: dict[str, PrivacyOverride] = Field(default_factory=dict)


class StrategyConfig(_Strict):
    """Aggregation strategy by name; each strategy reads only its own parameters."""

    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedbn", "fedmedian",
                  "fedtrimmedavg", "dpfedavg"] = "fedavg"
    mu: float | None = Field(None, ge=0, description="FedProx proximal weight")
    server_lr: float | None = Field(None, gt=0, description="FedAdam/FedYogi/FedAdagrad eta")
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    tau: float | None = Field(None, gt=0)
    beta: float | None = Field(None, ge=0, lt=0.5, description="FedTrimmedAvg trim fraction")
    clip_norm: float | None = Field(None, gt=0, description="DP-FedAvg update clipping norm")
    noise_multiplier: float | None = Field(None, ge=0, description="DP-FedAvg noise / clip")
    delta: float | None = Field(None, gt=0, lt=1, description="DP-FedAvg delta")

    @model_validator(mode="after")
    def _dpfedavg_needs_its_noise(self) -> StrategyConfig:
        if self.name == "dpfedavg" and (self.clip_norm is None or self.noise_multiplier is None):
            raise ValueError("dpfedavg needs federation.strategy.clip_norm and "
                             "federation.strategy.noise_multiplier")
        return self

    def params(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}


class FederationConfig(_Strict):
    hospitals: int = Field(4, ge=1)
    rounds: int = Field(5, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    min_clients: int = Field(1, ge=1)
    round_timeout_s: float = Field(3600.0, gt=0)
    strategy: StrategyConfig = StrategyConfig()

    @model_validator(mode="after")
    def _min_clients_fits(self) -> FederationConfig:
        if self.min_clients > self.hospitals:
            raise ValueError(
                f"min_clients ({self.min_clients}) exceeds hospitals ({self.hospitals})"
            )
        return self


class FaultPoint(_Strict):
    """Test-only: make one process raise or exit at a named point of a round."""

    process: str = Field(..., description="a hospital's name, or 'coordinator'")
    point: Literal["before_fit", "after_fit", "after_state_saved", "before_checkpoint",
                   "after_checkpoint", "during_write"]
    round: int | None = Field(None, ge=1, description="only in this round; None = every round")
    action: Literal["raise", "exit", "hang"] = "raise"
    path_contains: str | None = Field(None, description="during_write: only for such files")


class RuntimeConfig(_Strict):
    """Where and how actors run; only runtime.py reads this."""

    address: str | None = Field(None, description="Ray address; None starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray; None = all")
    hospital_num_cpus: float | None = Field(None, gt=0, description="None = share CPUs evenly")
    hospital_num_gpus: float = Field(0.0, ge=0)
    coordinator_num_cpus: float = Field(0.0, ge=0)
    coordinator_num_gpus: float = Field(0.0, ge=0)
    hospitals_per_process: int | None = Field(
        None, ge=1, description="hospitals sharing one worker process; None = one each, "
                                "except on a local Ray where they outnumber the CPUs (one "
                                "process per CPU)")
    max_restarts: int = Field(1, ge=0)
    restart_wait_s: float = Field(120.0, ge=0, description="wait for a restarting hospital")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hospital_resources: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="per hospital, custom Ray resources its actor requires, e.g. "
                    "{hospital_a: {hospital_a: 1}} pins it to the node started with "
                    "--resources '{\"hospital_a\": 1}'")
    pin_hospitals_to_nodes: bool = Field(
        False, description="hospital X requires custom resource X: 0.001 (its site's node)")
    start_timeout_s: float = Field(
        600.0, gt=0, description="a hospital not started by then is a StartupError")
    coordinator: Literal["auto", "driver", "actor"] = Field(
        "auto", description="where the coordinator runs: in the driver's process, in an actor, "
                            "or auto (the driver on a local Ray, an actor on a cluster)")
    fault_injection: list[FaultPoint] = Field(
        default_factory=list, description="test-only: named points where a process fails")


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 0
    output_dir: Path = Path("runs")
    checkpoint_keep: int = Field(2, ge=1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _one_hospital_per_site(self) -> ExperimentConfig:
        sites = self.data.sites
        if self.data.source == "sites" and len(sites) != self.federation.hospitals:
            raise ValueError(f"federation.hospitals is {self.federation.hospitals} but "
                             f"data.sites names {len(sites)} ({', '.join(sorted(sites))}): "
                             "set federation.hospitals to the number of sites")
        return self

    @model_validator(mode="after")
    def _private_models_are_dp_safe(self) -> ExperimentConfig:
        if self.privacy.enabled and not self.model.dp_safe:
            raise ValueError("privacy.enabled needs model.dp_safe: true (GroupNorm instead of "
                             "BatchNorm, no in-place ops); set both")
        if self.federation.strategy.name == "dpfedavg" and not self.model.dp_safe:
            raise ValueError("federation.strategy.name dpfedavg needs model.dp_safe: true "
                             "(noised BatchNorm running variances turn negative)")
        if self.privacy.enabled and self.federation.strategy.name == "fedprox":
            raise ValueError("federation.strategy.name fedprox is not available with "
                             "privacy.enabled: Opacus replaces the proximal term's gradient")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def format_validation_error(err: ValidationError, heading: str,
                            unknown_key_hint: str = "check spelling; see README config reference"
                            ) -> str:
    """`heading:` then one line per bad field: its dotted path, what is wrong and the value
    given; an unknown key gets `unknown_key_hint` as its fix. Shared by every typed config
    (experiments, sweeps, serve args) so their errors read alike."""
    lines = [f"{heading}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key ({unknown_key_hint})")
        else:
            lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value`; the value is read as YAML so numbers and lists keep their type."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return path, value


Overrides = list[str] | dict[str, Any]


def _override_items(overrides: Overrides) -> list[tuple[str, list[str], Any]]:
    """(as written, dotted path, value) of each override: `a.b=v` strings are read as YAML;
    a mapping {"a.b": value} keeps its values as the Python values they are."""
    if not isinstance(overrides, dict):
        return [(item, *parse_override(item)) for item in overrides]
    items = []
    for key, value in overrides.items():
        path = [p for p in str(key).strip().split(".") if p]
        if not path:
            raise ConfigError(f"override {key!r} has an empty key")
        items.append((f"{key}={value!r}", path, value))
    return items


def apply_overrides(raw: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    for item, path, value in _override_items(overrides):
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: Path | dict[str, Any] | None = None,
                overrides: Overrides | None = None) -> ExperimentConfig:
    """Read a YAML experiment (or take a mapping, or the defaults) and apply overrides (`--set`
    strings or a {"a.b": value} mapping), validating once."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if isinstance(path, dict):
        raw, origin = copy.deepcopy(path), "a mapping"
    elif path is not None:
        origin = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, overrides)
        origin += " with --set " + " ".join(item for item, _, _ in _override_items(overrides))
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"invalid config ({origin})")) from None
