"""Model packages: a run's global model as a self-contained, verifiable folder to serve or share.

A package holds the weights (safetensors), the run's resolved config, a TorchScript copy for
fast CPU inference (checked against the PyTorch model at export), and a model card (card.json
for machines, card.md for people). card.json lists every file with its SHA-256 and carries the
digest of its own content, so `load_package` refuses a package whose files were changed,
removed or truncated, naming the file at fault. That is integrity, not authorship: anyone
able to rewrite every file can re-hash them; sign the folder if that matters. `verify` also
refuses card file names that could reach outside the folder (`..`, absolute paths), files that
are symlinks, and cards missing a field the loader needs, naming the name or field.

Out-of-distribution score. A classifier answers every input with some class, a blank slide or
sensor noise included, so the package also says how far an image lies from the images it was
validated on: the cosine-type distance from the image's penultimate features (the input of the
last Linear layer, L2-normalised) to the nearest class centroid of the run's validation split
(`ood.safetensors`). The threshold is a high percentile (default the 99th) of the validation
images' own scores; the card states it and the share of validation images beyond it (the
false-abstain rate). A feature distance, not the energy score -logsumexp(logits): energy reads
only the logits, and a lightly trained model gives noise images more confident logits than
smears (lower energy), while their features lie far from every class. Beyond the threshold a
served prediction abstains (fedray.serving), with its probabilities still given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

from fedray.artifacts.ood import last_linear as _last_linear  # noqa: F401
from fedray.artifacts.ood import logits_and_features as _logits_and_features
from fedray.artifacts.ood import ood_scores
from fedray.artifacts import run_folder as rf

if TYPE_CHECKING:  # torch loads only when a package is made or used, not for the CLI's parser
    import torch
    from torch import Tensor, nn

FORMAT = "fedray-model-package"
FORMAT_VERSION = 1
CARD = "card.json"
CARD_MD = "card.md"
WEIGHTS = "model.safetensors"
SCRIPTED = "model.ts"
CONFIG = "config.yaml"
OOD = "ood.safetensors"
OOD_QUANTILE = 0.99
OOD_CALIBRATION, OOD_CENTROIDS = rf.OOD_CALIBRATION, rf.OOD_CENTROIDS  # a site run's
SCRIPT_TOLERANCE = 1e-4
# card fields the loader and the service read: (dotted path, type); a card without one is refused
REQUIRED_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("name", str), ("version", str), ("files", dict), ("model", dict), ("model.backbone", str),
    ("model.classes", list), ("model.dp_safe", bool), ("model.dropout", (int, float)),
    ("input", dict), ("input.image_size", int), ("input.mean", list), ("input.std", list),
    ("card_sha256", str),
)


class PackageError(ValueError):
    """A package (or the run it is made from) that cannot be used; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _card_digest(card: dict) -> str:
    body = {k: v for k, v in card.items() if k != "card_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def config_hash(config: Any) -> str:
    """Digest of the resolved config (field order and YAML formatting do not matter)."""
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the package


@dataclass
class ModelPackage:
    """A loaded package: the model in eval mode and what its inputs and outputs mean."""

    path: Path
    card: dict
    model: nn.Module
    runtime: str
    device: torch.device
    _eager: nn.Module | None = field(default=None, repr=False)
    centroids: Tensor | None = field(default=None, repr=False)  # (classes, features)
    frozen: bool = False  # model is freeze_for_cpu's graph of the eager model's outputs

    @property
    def ood_threshold(self) -> float | None:
        """Scores above this abstain; None when the package has no OOD calibration."""
        ood = self.card.get("ood") or {}
        threshold = ood.get("threshold")
        return None if threshold is None or self.centroids is None else float(threshold)

    @property
    def backbone(self) -> str:
        return self.card["model"]["backbone"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.card["model"]["classes"])

    @property
    def image_size(self) -> int:
        return int(self.card["input"]["image_size"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.card["input"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.card["input"]["std"])

    @property
    def model_hash(self) -> str:
        return self.card["files"][WEIGHTS]["sha256"]

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    def preprocess(self, images: list[np.ndarray]) -> Tensor:
        """RGB uint8 HxWx3 images -> the normalised batch the model was trained on.

        Resizing is fedray.data.decode.resized, the function shards are decoded with.
        """
        from PIL import Image

        from fedray.data.decode import resized

        size = self.image_size
        batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected an RGB uint8 HxWx3 array, got "
                                 f"{image.dtype} {tuple(image.shape)}")
            if image.shape[:2] != (size, size):
                image = resized(Image.fromarray(image), size)
            batch[i] = image
        import torch

        # NCHW in contiguous memory, as the model was trained on: the permuted NHWC view is
        # channels_last, which makes every convolution copy its input (2-4x slower per batch).
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def forward(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits and penultimate features (None where the model gives no features)."""
        import torch

        with torch.inference_mode():
            if self.runtime == "torchscript" or self.frozen:
                out = self.model(batch.to(self.device))
                return (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
            return _logits_and_features(self.model, batch.to(self.device))

    def predict_proba(self, batch: Tensor) -> Tensor:
        import torch

        return torch.softmax(self.forward(batch)[0].float(), dim=1)

    def score(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        """Class probabilities and OOD scores (None without calibration): one forward pass."""
        import torch

        logits, features = self.forward(batch)
        probs = torch.softmax(logits.float(), dim=1)
        if self.centroids is None or features is None:
            return probs, None
        return probs, ood_scores(features, self.centroids)

    def eager_model(self) -> nn.Module:
        """The PyTorch module (for attributions), whatever runtime serves predictions."""
        if self._eager is None:
            self._eager = self.fresh_eager_model()
        return self._eager

    def fresh_eager_model(self) -> nn.Module:
        """A new PyTorch module from the package's weights, shared with nothing."""
        return _build_eager(self.path, self.card).to(self.device)

    def explainable(self):
        """The package as fedray.explain's LoadedModel."""
        from fedray.artifacts.model import LoadedModel

        return LoadedModel(model=self.eager_model(), backbone=self.backbone,
                           image_size=self.image_size, classes=self.classes, source=self.path)


def _build_eager(folder: Path, card: dict) -> nn.Module:
    from fedray.artifacts import checkpoint
    from fedray.federation.messages import to_torch
    from fedray.models import build_model

    m = card["model"]
    model = build_model(m["backbone"], num_classes=len(m["classes"]), dp_safe=m["dp_safe"],
                        dropout=m["dropout"])
    try:
        model.load_state_dict(to_torch(checkpoint.load_weights(folder / WEIGHTS)))
    except Exception as exc:  # noqa: BLE001 - a wrong or corrupt file: name it
        raise PackageError(f"{folder / WEIGHTS}: cannot load into {m['backbone']!r} ({exc})") from exc
    return model.eval()


# --------------------------------------------------------------------------- export


def _is_uri(location: str) -> bool:
    return "://" in location


def _filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow's filesystem for a URI (s3://, gs://, ...) and the path in it."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _read(location: str) -> bytes | None:
    """A small file at a local path or URI (s3://...); None when it cannot be read."""
    if not _is_uri(location):
        return Path(location).read_bytes() if Path(location).is_file() else None
    try:
        filesystem, path = _filesystem(location)
        with filesystem.open_input_stream(path) as fh:
            return fh.read()
    except (OSError, ValueError):  # missing, unknown scheme, no credentials
        return None


def _source_run(source: str | Path) -> tuple[Path, Path | None]:
    """The run folder to export, local or a URI: the folder itself, or the best trial a sweep's
    best.json names (a path, relative to the sweep, or the URI of a sweep on remote storage).
    Returned as `_localise` does: a remote run is downloaded, only that run."""
    text = str(source)
    if not _is_uri(text):
        local = Path(text).expanduser().resolve()
        if not local.exists():
            raise PackageError(f"{local}: no such run folder")
        text = str(local)
    best = _read(f"{text}/best.json")
    if _read(f"{text}/{CONFIG}") is None and best is not None:
        try:
            run_dir = str(json.loads(best)["run_dir"])
        except (KeyError, ValueError) as exc:
            raise PackageError(f"{text}/best.json: no 'run_dir' of the best trial ({exc})") from exc
        absolute = _is_uri(run_dir) or Path(run_dir).is_absolute()
        text = run_dir if absolute else f"{text}/{run_dir}"
    if _read(f"{text}/{CONFIG}") is None:
        raise PackageError(f"{text}: not a run folder (no {CONFIG}) and no sweep best.json")
    return _localise(text)


def _epsilons(run_dir: Path) -> dict[str, Any]:
    """Cumulative epsilon per hospital (and the server's, for DP-FedAvg) at the end of the run:
    from the hospitals' own ledgers (metrics.json's privacy object, which also counts a round
    whose update arrived too late), else from the last round records (older runs)."""
    out: dict[str, Any] = {}
    try:
        privacy = json.loads((run_dir / "metrics.json").read_text()).get("privacy") or {}
    except (OSError, ValueError):
        privacy = {}
    if privacy.get("hospitals") or privacy.get("client_level"):
        out = {h: m["epsilon"] for h, m in sorted((privacy.get("hospitals") or {}).items())}
        if privacy.get("client_level"):
            out["server (client-level)"] = privacy["client_level"].get("epsilon")
        return out
    history = run_dir / "metrics.jsonl"
    if not history.is_file():
        return out
    for line in history.read_text().splitlines():
        record = json.loads(line)
        for name, report in record.get("hospitals", {}).items():
            if "epsilon" in report:
                out[name] = report["epsilon"]
        if record.get("server_dp"):
            out["server (client-level)"] = record["server_dp"].get("epsilon")
    return out


def _privacy_statement(run_dir: Path, sweep_total: dict | None) -> dict[str, Any]:
    """What the card's epsilon means: the unit, the accountant, whether the noise was seeded
    (then it is no guarantee), and a sweep's total over all its trials."""
    try:
        privacy = json.loads((run_dir / "metrics.json").read_text()).get("privacy") or {}
    except (OSError, ValueError):
        privacy = {}
    statement = {k: privacy.get(k) for k in ("unit", "accountant", "reproducible_noise",
                                             "guarantee", "warning") if k in privacy}
    if sweep_total:
        statement["sweep_total"] = {h: v["epsilon_total"]
                                    for h, v in sweep_total.get("hospitals", {}).items()}
        statement["sweep_total_composition"] = sweep_total.get("composition")
    return statement


def _federated_ood(run_dir: Path, quantile: float) -> tuple[dict, np.ndarray]:
    """The card's `ood` entry from a site-mode run's federated calibration (ood.json: the
    pooled score histogram of the sites' validation images; the centroids beside it)."""
    from fedray.artifacts import checkpoint, ood

    calibration = json.loads((run_dir / OOD_CALIBRATION).read_text())
    centroids = checkpoint.load_weights(run_dir / OOD_CENTROIDS)["centroids"]
    entry = ood.threshold_from_histograms([calibration["histogram"]], quantile)
    return {"score": "feature_distance",
            "definition": "min over classes c of ||f/|f| - mu_c||: f the input of the last Linear "
                          "layer, mu_c the mean normalised f of the validation images of class c "
                          f"(pooled over {calibration['sites']} sites, federated)",
            "quantile": quantile, "file": OOD, "classes": calibration["classes"],
            **entry}, centroids


def _data_summary(run_dir: Path) -> dict[str, Any]:
    """Images per hospital and split: the run's own shards', or those of the shards it was
    given (a sweep's, cross-validation's), which experiment.run records."""
    from fedray.artifacts.run_folder import SHARDS_USED

    for shards in (run_dir / "data" / "shards.json", run_dir / SHARDS_USED):
        if shards.is_file():
            return json.loads(shards.read_text()).get("counts", {})
    sites = run_dir / rf.DATA / rf.SITE_COUNTS
    if sites.is_file():  # site mode: the counts each site sent of its local splits
        return {f"{h} {split}": counts for h, splits in json.loads(sites.read_text())["sites"].items()
                for split, counts in (splits or {}).items()}
    return {"note": "shards were made outside the run folder; counts not recorded"}


def _scored(model: nn.Module) -> nn.Module:
    """`model` as a module whose outputs are its logits and penultimate features."""
    import torch

    class Scored(torch.nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return _logits_and_features(self.inner, x)

    return Scored(model)


def freeze_for_cpu(package: ModelPackage) -> ModelPackage:
    """The package with its forward pass as one frozen, inference-optimised TorchScript graph,
    for serving on CPU; a package on another device or runtime comes back as it is.

    An eager forward pass takes the GIL back after each of its ~100 operators, so beside a
    busy event loop in the same process (a Serve replica that also does HTTP) it waits for the
    loop at every one: a resnet18 pass at 64 px, batch 8, one thread, took 18 ms alone and 355
    ms beside a Python-busy thread; the frozen graph 15 and 25 ms (benchmarks/gil_convoy.py,
    benchmarks/results/gil_convoy.json). Freezing also folds batch
    norm into the convolutions and keeps their weights in oneDNN's layout, where an eager pass
    reorders them every time. The graph is checked against the eager model on a probe batch
    (PackageError past SCRIPT_TOLERANCE); eager_model() stays the PyTorch module, for
    explanations.
    """
    import torch

    if package.runtime != "pytorch" or package.frozen or package.device.type != "cpu":
        return package
    eager = package.model
    size = package.image_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    probe = torch.randn(3, 3, size, size, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        try:
            traced = torch.jit.trace(_scored(eager), example, check_trace=False).eval()
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            diff = max((a - b).abs().max().item()
                       for a, b in zip(graph(probe), _logits_and_features(eager, probe)))
        except Exception as exc:  # noqa: BLE001 - a model the tracer cannot take
            raise PackageError(f"{package.path}: cannot freeze {package.backbone} for CPU "
                               f"serving ({exc})") from exc
    if not diff <= SCRIPT_TOLERANCE:
        raise PackageError(f"{package.path}: the frozen graph differs from the PyTorch model by "
                           f"{diff:.2e} (> {SCRIPT_TOLERANCE})")
    return replace(package, model=graph, _eager=eager, frozen=True)


def _script(model: nn.Module, image_size: int, path: Path) -> float:
    """Trace to TorchScript (outputs: logits and penultimate features), save, reload and return
    the largest difference from the PyTorch model's outputs."""
    import torch

    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, image_size, image_size, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        traced = torch.jit.trace(_scored(model), example, check_trace=False)
        traced.save(str(path))
        probe = torch.randn(3, 3, image_size, image_size, generator=gen)
        reloaded = torch.jit.load(str(path), map_location="cpu").eval()
        diff = max((a - b).abs().max().item()
                   for a, b in zip(reloaded(probe), _logits_and_features(model, probe)))
    if not diff <= SCRIPT_TOLERANCE:
        raise PackageError(f"{path}: TorchScript output differs from the PyTorch model by {diff:.2e} "
                           f"(> {SCRIPT_TOLERANCE}); export with --format none")
    return float(diff)


def _validation_shard(run_dir: Path) -> Path | None:
    """The run's validation shard: its own (data/), or that of the shards it was given."""
    from fedray.data.shards import ShardSet
    from fedray.artifacts.run_folder import SHARDS_USED

    roots = [run_dir / "data"]
    used = run_dir / SHARDS_USED
    if used.is_file():
        try:
            roots.append(Path(json.loads(used.read_text())["root"]))
        except (KeyError, TypeError, ValueError):
            pass
    for root in roots:
        if (root / "shards.json").is_file():
            shards = ShardSet.load(root)
            if shards.val and shards.path(shards.val).is_file():
                return shards.path(shards.val)
    return None


def _calibrate_ood(model: nn.Module, shard: Path | None, size: int, classes: list[str],
                   quantile: float) -> tuple[dict, np.ndarray | None]:
    """The card's `ood` entry and the class centroids, from the validation shard's features."""
    import torch

    from fedray.data.shards import ShardDataset
    from fedray.data.transforms import eval_preset

    entry: dict[str, Any] = {
        "score": "feature_distance",
        "definition": "min over classes c of ||f/|f| - mu_c||: f the input of the last Linear "
                      "layer, mu_c the mean normalised f of the validation images of class c",
        "quantile": quantile, "threshold": None}
    if shard is None:
        return {**entry, "note": "no validation split found at export: predictions never "
                                 "abstain"}, None
    data = ShardDataset.from_parquet(shard, size, eval_preset(size))
    features = []
    with torch.inference_mode():
        for start in range(0, len(data), 128):
            batch = torch.stack([data[i][0] for i in range(start, min(start + 128, len(data)))])
            features.append(_logits_and_features(model, batch)[1].float())
    unit = torch.nn.functional.normalize(torch.cat(features), dim=1)
    present = [c for c in range(len(classes)) if bool((data.labels == c).any())]
    centroids = torch.stack([unit[data.labels == c].mean(dim=0) for c in present])
    scores = ood_scores(unit, centroids).numpy()
    threshold = float(np.quantile(scores, quantile, method="higher"))
    return {**entry, "file": OOD, "classes": [classes[c] for c in present],
            "threshold": threshold, "validation_images": int(len(scores)),
            "false_abstain_rate": float(np.mean(scores > threshold)),
            "validation_scores": {"p50": float(np.quantile(scores, 0.5)),
                                  "p95": float(np.quantile(scores, 0.95)),
                                  "max": float(scores.max())}}, centroids.numpy()


def _ood_markdown(ood: dict) -> list[str]:
    if ood.get("threshold") is None:
        return [f"No out-of-distribution threshold: {ood.get('note', 'not calibrated')}."]
    return [f"Score: {ood['definition']}.",
            f"A served prediction abstains when the score is above {ood['threshold']:.4f}, the "
            f"{100 * ood['quantile']:g}th percentile of the {ood['validation_images']} validation "
            f"images' scores; {100 * ood['false_abstain_rate']:.1f}% of those validation images "
            "abstain (false-abstain rate)."]


def _counts_markdown(counts: dict, classes: list[str]) -> list[str]:
    if "note" in counts:
        return [counts["note"]]
    rows = ["| | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
    for part, per_class in counts.items():
        values = [int(per_class.get(c, 0)) for c in classes]
        rows.append(f"| {part} | " + " | ".join(map(str, values)) + f" | {sum(values)} |")
    return rows


def _card_markdown(card: dict) -> str:
    from fedray.metrics import format_table

    m, inp, tr = card["model"], card["input"], card["training"]
    lines = [f"# {card['name']} {card['version']}", "",
             f"Classifier of acute lymphoblastic leukemia subtypes from peripheral blood smears: "
             f"{', '.join(m['classes'])}.", "",
             "## Model", "",
             f"- backbone `{m['backbone']}` (DP-safe: {m['dp_safe']}), dropout {m['dropout']}",
             f"- input: RGB {inp['image_size']}x{inp['image_size']} px, {inp['resize']} resize, "
             f"mean {inp['mean']}, std {inp['std']}",
             f"- weights SHA-256 `{card['files'][WEIGHTS]['sha256']}`",
             "", "## Training", "",
             f"- strategy `{tr['strategy']}`, {tr['rounds']} rounds run, best round {tr['best_round']} "
             f"({tr['stop_reason']})",
             f"- differential privacy: {tr['privacy']}"]
    if tr["epsilon"]:
        lines.append("- cumulative epsilon (each hospital's ledger): " + ", ".join(
            f"{k} {('%.2f' % v) if isinstance(v, (int, float)) else v}" for k, v in tr["epsilon"].items()))
    detail = tr.get("privacy_detail") or {}
    if detail.get("unit"):
        lines.append(f"- privacy unit: {detail['unit']}; accountant {detail.get('accountant')}")
    if detail.get("warning"):
        lines.append(f"- **{detail['warning']}**")
    if detail.get("sweep_total"):
        lines.append("- total epsilon over every trial of the sweep: " + ", ".join(
            f"{k} {v:.2f}" for k, v in detail["sweep_total"].items()))
    lines += ["", "### Images per hospital and split", "", *_counts_markdown(card["data"], m["classes"]),
              "", "## Out-of-distribution inputs", "", *_ood_markdown(card["ood"]),
              "", "## Metrics", "", card["metrics"]["note"], "", "```",
              format_table({k: v for k, v in card["metrics"].items() if isinstance(v, dict)}), "```",
              "", "## Provenance", "",
              f"- fedray {card['fedray_version']}, created {card['created']}",
              f"- config SHA-256 `{card['config_sha256']}` ({CONFIG} in this package)",
              f"- files (SHA-256 of each in {CARD}): "
              + ", ".join(f"`{k}`" for k in [*card["files"], CARD_MD]), ""]
    return "\n".join(lines)


def export_package(source: str | Path, output: Path, *, name: str | None = None,
                   version: str | None = None,
                   formats: tuple[str, ...] = ("torchscript",),
                   ood_quantile: float = OOD_QUANTILE) -> Path:
    """Write the model package of a run (or a sweep's best trial), a folder or URI, to
    `output`; return it. `ood_quantile` sets the abstain threshold: that quantile of the
    validation images' OOD scores.

    The folder is written under a temporary name and renamed into place, so an interrupted
    export never leaves a package that looks whole.
    """
    if not 0.5 <= ood_quantile <= 1.0:
        raise PackageError(f"ood_quantile {ood_quantile}: choose a quantile in [0.5, 1], e.g. "
                           f"{OOD_QUANTILE}")
    unknown = set(formats) - {"torchscript", "none"}
    if unknown:
        raise PackageError(f"unknown export format(s) {sorted(unknown)}: use torchscript or none")
    run_dir, download = _source_run(source)
    best = _read(f"{source}/best.json") if _read(f"{source}/{CONFIG}") is None else None
    sweep_total = json.loads(best).get("privacy_total") if best else None
    try:
        return _write_package(run_dir, Path(output), name=name, version=version,
                              formats=formats, ood_quantile=ood_quantile,
                              sweep_total=sweep_total)
    finally:
        if download is not None:
            shutil.rmtree(download, ignore_errors=True)


def _write_package(run_dir: Path, output: Path, *, name: str | None, version: str | None,
                   formats: tuple[str, ...], ood_quantile: float,
                   sweep_total: dict | None = None) -> Path:
    from fedray import __version__
    from fedray.models import input_size
    from fedray.config import load_config
    from fedray.data.labels import CLASSES
    from fedray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from fedray.artifacts.run_folder import run_weights
    import torch

    output = output.expanduser().resolve()
    if output.exists() and any(output.iterdir()):
        raise PackageError(f"{output}: exists and is not empty; choose another --output")
    config = load_config(run_dir / CONFIG)
    try:
        weights = run_weights(run_dir)
    except FileNotFoundError as exc:
        raise PackageError(str(exc)) from exc
    metrics_path = run_dir / "metrics.json"
    final = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    tmp = output.parent / f".tmp_{output.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(weights, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(config.to_yaml())
        size = input_size(config)
        m = config.model
        card: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "name": name or config.name,
            "version": version or time.strftime("%Y%m%d-%H%M%S"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fedray_version": __version__,
            "source_run": run_dir.name,
            "model": {"backbone": m.backbone, "classes": list(CLASSES), "dp_safe": m.dp_safe,
                      "dropout": m.dropout, "weights_from": weights.relative_to(run_dir).as_posix()},
            "input": {"image_size": size, "channels": "RGB", "resize": "bilinear",
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "training": {
                "strategy": config.federation.strategy.name,
                "hospitals": config.federation.hospitals,
                "rounds": final.get("rounds"), "best_round": final.get("best_round"),
                "stop_reason": final.get("stop_reason", "unfinished run (newest checkpoint)"),
                "privacy": ("DP-SGD in each hospital" if config.privacy.enabled else "none")
                + ("; client-level DP-FedAvg" if config.federation.strategy.name == "dpfedavg" else ""),
                "epsilon": _epsilons(run_dir),
                "privacy_detail": _privacy_statement(run_dir, sweep_total),
            },
            "data": _data_summary(run_dir),
            "metrics": {"note": (f"best round's global model on the run's held-out splits (split "
                                 f"before any augmentation: {config.data.split.model_dump()})")
                        if final else "no final evaluation (unfinished run)",
                        **{k: final[k] for k in ("val", "test") if k in final}},
            "config_sha256": config_hash(config),
        }
        model = _build_eager(tmp, card)
        if (run_dir / OOD_CALIBRATION).is_file() and _validation_shard(run_dir) is None:
            card["ood"], centroids = _federated_ood(run_dir, ood_quantile)
        else:
            card["ood"], centroids = _calibrate_ood(model, _validation_shard(run_dir), size,
                                                    list(CLASSES), ood_quantile)
        if centroids is not None:
            from fedray.artifacts import checkpoint

            checkpoint.save_weights({"centroids": centroids}, tmp / OOD)
        if "torchscript" in formats:
            card["torchscript"] = {"file": SCRIPTED, "max_abs_diff": _script(model, size, tmp / SCRIPTED),
                                   "torch_version": torch.__version__}
        card["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(tmp.iterdir())}
        (tmp / CARD_MD).write_text(_card_markdown(card))  # hashed too: people read this one
        card["files"][CARD_MD] = {"sha256": sha256_file(tmp / CARD_MD),
                                  "bytes": (tmp / CARD_MD).stat().st_size}
        card["card_sha256"] = _card_digest(card)
        (tmp / CARD).write_text(json.dumps(card, indent=1))
        if output.exists():
            output.rmdir()
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


# --------------------------------------------------------------------------- load and verify


def _localise(uri: str | Path) -> tuple[Path, Path | None]:
    """A local folder for a path, file:// URI or pyarrow filesystem URI (s3://, gs://, ...),
    and the temporary download that holds it (None for a local folder), for the caller to
    delete once done."""
    text = str(uri)
    if not _is_uri(text):
        return Path(text).expanduser().resolve(), None
    if text.startswith("file://"):
        return Path(text[len("file://"):]).resolve(), None
    import pyarrow.fs as pafs

    try:
        filesystem, root = _filesystem(text)
    except Exception as exc:  # noqa: BLE001 - unknown scheme, missing credentials
        raise PackageError(f"{text}: cannot open this URI ({exc})") from exc
    download = Path(tempfile.mkdtemp(prefix="fedray-package-"))
    local = download / (root.rstrip("/").rsplit("/", 1)[-1] or "package")  # keeps its name
    local.mkdir()
    try:
        pafs.copy_files(root, str(local), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
    except Exception as exc:  # noqa: BLE001
        shutil.rmtree(download, ignore_errors=True)
        raise PackageError(f"{text}: cannot download ({exc})") from exc
    return local, download


def verify_package(path: str | Path) -> dict:
    """The card of a complete, untampered package; PackageError naming the first problem."""
    folder, download = _localise(path)
    try:
        return _verify(folder)
    finally:
        if download is not None:
            shutil.rmtree(download, ignore_errors=True)


def _check_fields(card: dict, card_path: Path) -> None:
    """PackageError naming the first field the loader needs that is missing or mistyped."""
    for dotted, kind in REQUIRED_FIELDS:
        node: Any = card
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                raise PackageError(f"{card_path}: missing field {dotted!r}")
            node = node[key]
        if not isinstance(node, kind) or (isinstance(node, bool) and kind in (int, (int, float))):
            raise PackageError(f"{card_path}: field {dotted!r} is {type(node).__name__} "
                               f"{node!r:.60}, not {getattr(kind, '__name__', 'a number')}")
    for name, meta in card["files"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or \
                not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool):
            raise PackageError(f"{card_path}: field 'files.{name}' needs a 'sha256' string and "
                               f"a 'bytes' count, got {meta!r:.80}")
    ood = card.get("ood")
    if ood is not None and ood.get("threshold") is not None:
        threshold = ood["threshold"]
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise PackageError(f"{card_path}: field 'ood.threshold' is {threshold!r:.40}, not a "
                               "number")
        if not isinstance(ood.get("classes"), list):
            raise PackageError(f"{card_path}: missing field 'ood.classes'")
        if ood.get("file") not in card["files"]:
            raise PackageError(f"{card_path}: field 'ood.file' ({ood.get('file')!r}) names no "
                               "file the card lists")


def _member(folder: Path, name: Any, card_path: Path) -> Path:
    """The package file a card names, refused if the name could lead outside the folder."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise PackageError(f"{card_path}: file name {name!r} is not a plain file name")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name[0] in "/\\":
        raise PackageError(f"{card_path}: file name {name!r} is an absolute path; a card names "
                           "files inside its package only")
    if ".." in posix.parts or ".." in windows.parts:
        raise PackageError(f"{card_path}: file name {name!r} contains '..'; a card names files "
                           "inside its package only")
    item = folder
    for part in posix.parts:
        item = item / part
        if item.is_symlink():
            raise PackageError(f"{item}: a symlink (file {name!r}); a package holds plain files "
                               "only")
    return item


def _verify(folder: Path) -> dict:
    card_path = folder / CARD
    if not folder.is_dir():
        raise PackageError(f"{folder}: no such package folder")
    for entry in sorted(folder.rglob("*")):
        if entry.is_symlink():
            raise PackageError(f"{entry}: a symlink; a package holds plain files only")
    if not card_path.is_file():
        raise PackageError(f"{card_path}: missing; not a fedray model package")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as exc:
        raise PackageError(f"{card_path}: not valid JSON ({exc})") from exc
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise PackageError(f"{card_path}: not a {FORMAT} card")
    if card.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{card_path}: format_version {card.get('format_version')!r}; this "
                           f"fedray reads {FORMAT_VERSION}")
    _check_fields(card, card_path)
    if card.get("card_sha256") != _card_digest(card):
        raise PackageError(f"{card_path}: its content does not match its card_sha256 (edited?)")
    files = card["files"]
    for required in (WEIGHTS, CONFIG):
        if required not in files:
            raise PackageError(f"{card_path}: lists no {required}")
    for name, meta in files.items():
        item = _member(folder, name, card_path)
        if not item.is_file():
            raise PackageError(f"{item}: missing from the package")
        if item.stat().st_size != meta["bytes"] or sha256_file(item) != meta["sha256"]:
            raise PackageError(f"{item}: SHA-256 differs from the card (tampered or truncated)")
    return card


def load_package(uri: str | Path, *, verify: bool = True, runtime: str = "pytorch",
                 device: str = "cpu") -> ModelPackage:
    """Load a package for inference; verification is on unless the caller opts out.

    A package given as a remote URI is downloaded to a temporary folder, deleted once the
    returned package is garbage-collected (its eager_model() reads that folder again)."""
    if runtime not in ("pytorch", "torchscript"):
        raise PackageError(f"runtime {runtime!r}: use 'pytorch' or 'torchscript'")
    folder, download = _localise(uri)
    try:
        package = _load(folder, verify, runtime, device)
    except BaseException:
        if download is not None:
            shutil.rmtree(download, ignore_errors=True)
        raise
    if download is not None:
        weakref.finalize(package, shutil.rmtree, download, ignore_errors=True)
    return package


def _load(folder: Path, verify: bool, runtime: str, device: str) -> ModelPackage:
    import torch

    if verify:
        card = _verify(folder)
    else:
        try:
            card = json.loads((folder / CARD).read_text())
        except (OSError, ValueError) as exc:
            raise PackageError(f"{folder / CARD}: cannot read ({exc})") from exc
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else "cpu" if device == "auto" else device)
    if runtime == "torchscript":
        if SCRIPTED not in card.get("files", {}):
            raise PackageError(f"{folder}: has no {SCRIPTED}; load with runtime='pytorch'")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(folder / SCRIPTED), map_location=dev).eval()
        except Exception as exc:  # noqa: BLE001
            raise PackageError(f"{folder / SCRIPTED}: cannot load ({exc})") from exc
        return ModelPackage(folder, card, model, runtime, dev,
                            centroids=_centroids(folder, card, dev))
    model = _build_eager(folder, card).to(dev)
    return ModelPackage(folder, card, model, runtime, dev, _eager=model,
                        centroids=_centroids(folder, card, dev))


def _centroids(folder: Path, card: dict, device: torch.device) -> Tensor | None:
    """The OOD class centroids of a calibrated package (None for one without)."""
    ood = card.get("ood") or {}
    if ood.get("threshold") is None:
        return None
    import torch

    from fedray.artifacts import checkpoint

    path = folder / ood.get("file", OOD)
    try:
        centroids = torch.as_tensor(checkpoint.load_weights(path)["centroids"])
    except Exception as exc:  # noqa: BLE001 - a wrong or corrupt file: name it
        raise PackageError(f"{path}: cannot read the OOD centroids ({exc})") from exc
    if centroids.ndim != 2 or len(centroids) != len(ood.get("classes", [])):
        raise PackageError(f"{path}: centroids of shape {tuple(centroids.shape)} for "
                           f"{len(ood.get('classes', []))} classes")
    return centroids.float().to(device)


def is_package(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CARD).is_file()


# --------------------------------------------------------------------------- command line


def add_cli(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="a run's (or a sweep's best) model as a verifiable package")
    exp.add_argument("source", metavar="RUN_OR_SWEEP",  # a str: Path would mangle s3://
                     help="a run folder, or a sweep folder (its best.json names the best "
                          "trial); local or a URI such as s3://bucket/sweeps/NAME")
    exp.add_argument("--output", type=Path, required=True, help="package folder to create")
    exp.add_argument("--name", help="model name (default: the run's config name)")
    exp.add_argument("--version", help="model version (default: a timestamp)")
    exp.add_argument("--format", dest="formats", nargs="+", default=["torchscript"],
                     choices=["torchscript", "none"], help="extra inference file(s)")
    exp.add_argument("--ood-quantile", type=float, default=OOD_QUANTILE,
                     help="abstain threshold: this quantile of the validation split's OOD "
                          f"scores (default {OOD_QUANTILE})")
    exp.set_defaults(func=cmd_export)

    ver = sub.add_parser("verify", help="check a model package's files against its card")
    ver.add_argument("package", help="package folder or URI")
    ver.set_defaults(func=cmd_verify)


def cmd_export(args: argparse.Namespace) -> int:
    formats = tuple(f for f in args.formats if f != "none")
    folder = export_package(args.source, args.output, name=args.name, version=args.version,
                            formats=formats, ood_quantile=args.ood_quantile)
    card = json.loads((folder / CARD).read_text())
    print(f"package: {folder}")
    print(f"model {card['name']} {card['version']}  backbone {card['model']['backbone']}  "
          f"weights sha256 {card['files'][WEIGHTS]['sha256'][:16]}...")
    ood = card["ood"]
    if ood["threshold"] is None:
        print(f"warning: {ood['note']}")
    else:
        print(f"out-of-distribution threshold {ood['threshold']:.4f} (validation quantile "
              f"{ood['quantile']}; {100 * ood['false_abstain_rate']:.1f}% of "
              f"{ood['validation_images']} validation images abstain)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    card = verify_package(args.package)
    print(f"{args.package}: OK ({len(card['files'])} files match the card; "
          f"{card['name']} {card['version']})")
    return 0
