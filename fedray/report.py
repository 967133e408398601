"""A run report: one self-contained HTML file and a Markdown summary, from a run folder alone.

Why a report and not just metrics.json: a federated run can look fine on its headline numbers
and still be wrong in ways only a picture or a cross-check shows: a hospital whose local model
does not transfer, a round dominated by one slow site, a test image that also sits in a training
shard, or a model that merely learned stain colour. Everything here is recomputed from the run
folder (shards, weights, metrics), so the report also works on runs copied from another machine.

The HTML embeds every figure as a base64 PNG (one file to mail or attach to a ticket); the
Markdown references the same PNGs, written beside it, for repositories and wikis. A
`report.json` beside them holds the checked numbers (cross-site matrix, leakage, baseline) for
scripts and CI.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure as MplFigure
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from fedray import checkpoint, engine
from fedray.client import input_size
from fedray.config import ExperimentConfig, load_config
from fedray.data.labels import CLASS_INDEX, CLASSES
from fedray.data.shards import ShardDataset, ShardSet
from fedray.data.transforms import eval_preset
from fedray.evaluate import run_weights
from fedray.messages import to_torch
from fedray.metrics import _balanced_accuracy, classification_metrics
from fedray.models import build_model

SHORTCUT_MARGIN = 0.10  # the model must beat the mean-colour baseline by this much (balanced acc.)
DPI = 100

# Section titles, shared by both renderers and by tests that look for them.
TITLES = {
    "summary": "Run summary",
    "data": "Data per hospital",
    "curves": "Training curves",
    "test": "Test set evaluation",
    "privacy": "Differential privacy",
    "timing": "Timing per round",
    "explanations": "Example explanations",
    "cross_site": "Cross-site validation",
    "checks": "Leakage and shortcut checks",
}


# ---- report building blocks -------------------------------------------------------------------
@dataclass
class Text:
    """A paragraph; `alert` renders it in red (HTML) or bold with a warning sign (Markdown)."""

    text: str
    alert: bool = False


@dataclass
class Table:
    """A plain table; `alert_cells` (row, column) are shown in red, for values that must be 0."""

    headers: list[str]
    rows: list[list[str]]
    alert_cells: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Figure:
    """A PNG already written to disk; HTML embeds its bytes, Markdown links its file name."""

    path: Path
    caption: str


Block = Text | Table | Figure


@dataclass
class Section:
    title: str
    blocks: list[Block]


# ---- the run, as read from its folder -----------------------------------------------------------
@dataclass
class Run:
    """Everything a report reads from one run folder; model predictions come later, lazily."""

    dir: Path
    config: ExperimentConfig
    shards: ShardSet
    records: list[dict]
    final: dict

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir}: no config.yaml (is it a run folder?)")
        jsonl = run_dir / "metrics.jsonl"
        records = ([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
                   if jsonl.is_file() else [])
        final_path = run_dir / "metrics.json"
        final = json.loads(final_path.read_text()) if final_path.is_file() else {}
        return cls(run_dir, load_config(run_dir / "config.yaml"),
                   ShardSet.load(run_dir / "data"), records, final)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def hospitals(self) -> list[str]:
        return sorted(self.shards.hospitals)


class Evaluator:
    """Decodes each shard once and runs models on it, on the run's configured device."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.size = input_size(run.config)
        self.device = engine.pick_device(run.config.runtime.device)
        self._datasets: dict[str, ShardDataset] = {}

    def dataset(self, file: str) -> ShardDataset:
        if file not in self._datasets:
            self._datasets[file] = ShardDataset.from_parquet(
                self.run.shards.path(file), self.size, eval_preset(self.size))
        return self._datasets[file]

    def model(self, weights: Path) -> nn.Module:
        m = self.run.config.model
        model = build_model(m.backbone, dp_safe=m.dp_safe, dropout=m.dropout)
        model.load_state_dict(to_torch(checkpoint.load_weights(weights)))
        return model.to(self.device).eval()

    def predict(self, model: nn.Module, file: str) -> engine.Predictions:
        loader = DataLoader(self.dataset(file), batch_size=self.run.config.training.eval_batch_size)
        return engine.predict(model, loader, self.device, amp=self.run.config.training.amp)


# ---- numbers the report checks (public: tests and scripts call them) ----------------------------
@dataclass
class Leakage:
    """Byte-identical images (recomputed sha256 of the stored bytes) found in several splits."""

    pairs: dict[str, int]  # "train/val", "train/test", "val/test" -> shared hashes
    shared: int  # distinct hashes present in two or more splits: must be 0
    between_hospitals: int  # hashes in two hospitals' training shards (not a split leak)
    stale_hashes: int  # rows whose stored sha256 differs from the bytes (corrupt shard)
    recorded: dict[str, int]  # what data/leakage.json said at preparation time


def split_files(shards: ShardSet) -> dict[str, list[str]]:
    """Train is the union of the hospital shards; local validation slices are part of val."""
    out = {"train": [shards.hospitals[h] for h in sorted(shards.hospitals)]}
    if shards.val:
        out["val"] = [shards.val]
    out["test"] = [shards.test]
    return out


def _file_hashes(path: Path) -> tuple[list[str], int]:
    """sha256 of each stored image and how many disagree with the shard's own sha256 column."""
    table = pq.read_table(path, columns=["sha256", "image"])
    digests = [hashlib.sha256(b).hexdigest() for b in table.column("image").to_pylist()]
    stale = sum(a != b for a, b in zip(digests, table.column("sha256").to_pylist()))
    return digests, stale


def leakage_check(shards: ShardSet) -> Leakage:
    """Recompute hashes from the shard bytes: leakage.json describes the data as prepared, this
    describes it as it is now (shards can be edited, merged or copied after preparation)."""
    per_split: dict[str, set[str]] = {}
    per_hospital: list[set[str]] = []
    stale = 0
    for split, files in split_files(shards).items():
        digests: set[str] = set()
        for file in files:
            values, bad = _file_hashes(shards.path(file))
            stale += bad
            digests.update(values)
            if split == "train":
                per_hospital.append(set(values))
        per_split[split] = digests
    names = list(per_split)
    pairs = {f"{a}/{b}": len(per_split[a] & per_split[b])
             for i, a in enumerate(names) for b in names[i + 1:]}
    seen: dict[str, int] = {}
    for digests in per_split.values():
        for d in digests:
            seen[d] = seen.get(d, 0) + 1
    hospital_seen: dict[str, int] = {}
    for digests in per_hospital:
        for d in digests:
            hospital_seen[d] = hospital_seen.get(d, 0) + 1
    recorded_path = shards.root / "leakage.json"
    recorded = (json.loads(recorded_path.read_text()).get("spanning_splits", {})
                if recorded_path.is_file() else {})
    return Leakage(pairs, sum(1 for n in seen.values() if n > 1),
                   sum(1 for n in hospital_seen.values() if n > 1), stale, recorded)


def _mean_rgb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean R, G, B in [0, 1] at native resolution, and the class indices."""
    table = pq.read_table(path, columns=["label", "image"])
    features = []
    for blob in table.column("image").to_pylist():
        with Image.open(io.BytesIO(blob)) as img:
            features.append(np.asarray(img.convert("RGB"), dtype=np.float32).mean((0, 1)) / 255)
    labels = np.array([CLASS_INDEX[x] for x in table.column("label").to_pylist()])
    return np.array(features).reshape(-1, 3), labels


def mean_colour_baseline(shards: ShardSet) -> dict[str, float]:
    """Logistic regression on mean RGB, pooled hospital training shards -> test.

    Why: stain colour differs between slides and labs; if three numbers per image classify as
    well as the network, the network may be reading the stain (a shortcut), not the cells.
    Pooling is fine here: it is an offline diagnostic, not part of the federated training.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parts = [_mean_rgb(shards.path(f)) for f in split_files(shards)["train"]]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _mean_rgb(shards.path(shards.test))
    if len(np.unique(y_train)) < 2:
        pred = np.full(len(y_test), y_train[0] if len(y_train) else 0)
    else:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        pred = clf.fit(x_train, y_train).predict(x_test)
    return {"accuracy": float((pred == y_test).mean()) if len(y_test) else 0.0,
            "balanced_accuracy": _balanced_accuracy(y_test, pred), "n_train": int(len(y_train)),
            "n_test": int(len(y_test))}


def shortcut_flag(model_bacc: float, baseline_bacc: float, margin: float = SHORTCUT_MARGIN) -> bool:
    """True when the model is not at least `margin` balanced accuracy above the baseline."""
    return not model_bacc >= baseline_bacc + margin - 1e-12


@dataclass
class CrossSite:
    """Rows: the global model then each hospital's local model; columns: validation sets."""

    rows: list[str]
    columns: list[str]
    accuracy: np.ndarray  # (rows, columns), NaN where a model or a set is missing
    balanced_accuracy: np.ndarray
    sizes: list[int]  # images per column: a 4-image slice makes a noisy cell

    @property
    def labels(self) -> list[str]:
        return [f"{c} (n={n})" for c, n in zip(self.columns, self.sizes)]


def cross_site_matrix(run: Run, ev: Evaluator) -> CrossSite:
    """How each model does on every hospital's own validation slice and on the global val.

    Why: a global accuracy can hide a hospital whose data the federation does not serve, and a
    local model that beats the global one at home but fails elsewhere shows non-IID drift.
    """
    columns = [h for h in run.hospitals if h in run.shards.local_val]
    files = [run.shards.local_val[h] for h in columns]
    if run.shards.val:
        columns, files = [*columns, "global val"], [*files, run.shards.val]
    weights = {"global": run_weights(run.dir)}
    for h in run.hospitals:
        weights[f"local {h}"] = run.dir / "hospitals" / h / "local_model.safetensors"
    rows = list(weights)
    sizes = [len(ev.dataset(f)) for f in files]
    acc = np.full((len(rows), len(columns)), np.nan)
    bacc = acc.copy()
    for i, path in enumerate(weights.values()):
        if not Path(path).is_file():
            continue
        model = ev.model(Path(path))
        for j, file in enumerate(files):
            pred = ev.predict(model, file)
            labels = pred.probs.argmax(1)
            acc[i, j] = float((labels == pred.labels).mean())
            bacc[i, j] = _balanced_accuracy(pred.labels, labels)
    return CrossSite(rows, columns, acc, bacc, sizes)


# ---- figures ------------------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 4.5) -> MplFigure:
    """A pyplot-free figure: no global backend state, no figure leak across many reports."""
    return MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: MplFigure, path: Path, caption: str) -> Figure:
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    return Figure(path, caption)


def _rounds(records: list[dict]) -> list[int]:
    return [r["round"] for r in records]


def _round_axis(ax: Any) -> None:
    """Rounds are integers: no 1.2, 1.4 ticks on a two-round run."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def _mark_best(ax: Any, best: int | None) -> None:
    if best:
        ax.axvline(best, color="grey", linestyle=":", linewidth=1, label=f"best round {best}")


def plot_curves(run: Run, path: Path) -> Figure:
    """Global validation loss/accuracy/balanced accuracy and each hospital's training loss."""
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2).ravel()
    with_val = [r for r in run.records if r.get("val")]
    best = run.final.get("best_round")
    for ax, key, label in zip(axes[:3], ("loss", "accuracy", "balanced_accuracy"),
                              ("validation loss", "validation accuracy",
                               "validation balanced accuracy")):
        ax.plot(_rounds(with_val), [r["val"][key] for r in with_val], marker="o")
        ax.set_title(f"global {label}")
        _mark_best(ax, best)
        if key != "loss":
            ax.set_ylim(0, 1.02)
    ax = axes[3]
    for h in run.hospitals:
        done = [r for r in run.records if h in r.get("hospitals", {})]
        ax.plot(_rounds(done), [r["hospitals"][h]["loss"] for r in done], marker="o", label=h)
    ax.set_title("local training loss per hospital")
    ax.legend(fontsize="small")
    for ax in axes:
        _round_axis(ax)
    return _save(fig, path, "Global validation metrics and local training loss per round")


def plot_confusion(matrix: np.ndarray, path: Path) -> Figure:
    fig = _figure(5.5, 4.8)
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(int(v)), ha="center", va="center",
                color="white" if top and v > top / 2 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title("confusion matrix (test)")
    return _save(fig, path, "Confusion matrix on the test shard")


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path) -> Figure:
    """One-vs-rest ROC per class; a class absent from (or alone in) the test set is skipped."""
    from sklearn.metrics import auc, roc_curve

    fig = _figure(6, 5)
    ax = fig.subplots()
    for c, name in enumerate(CLASSES):
        positive = labels == c
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{name} (not in test)")
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} AUC {auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC one-vs-rest (test)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path, "ROC curves per class (one-vs-rest) on the test shard")


def plot_epsilon(run: Run, path: Path) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    for h in run.hospitals:
        done = [r for r in run.records if "epsilon" in r.get("hospitals", {}).get(h, {})]
        ax.plot(_rounds(done), [r["hospitals"][h]["epsilon"] for r in done], marker="o", label=h)
    _round_axis(ax)
    ax.set_ylabel("epsilon (spent so far)")
    ax.set_title("privacy budget per hospital")
    ax.legend(fontsize="small")
    return _save(fig, path, "Differential privacy epsilon per hospital per round")


TIMING_PARTS = ("broadcast", "local training", "gather", "aggregation", "evaluation")


def round_timing(record: dict) -> dict[str, float]:
    """Split a round's wall time into its phases.

    Local training is the slowest hospital (the round waits for it); gather is what fit_s
    spends beyond broadcast and that slowest hospital: transfer and scheduling overhead.
    """
    t = record.get("timings", {})
    broadcast = float(t.get("broadcast_s", 0.0))
    local = max((float(h.get("seconds", 0.0)) for h in record.get("hospitals", {}).values()),
                default=0.0)
    gather = max(0.0, float(t.get("fit_s", 0.0)) - broadcast - local)
    return {"broadcast": broadcast, "local training": local, "gather": gather,
            "aggregation": float(t.get("aggregate_s", 0.0)),
            "evaluation": float(t.get("evaluate_s", 0.0))}


def plot_timing(records: list[dict], path: Path) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    rounds = _rounds(records)
    parts = [round_timing(r) for r in records]
    bottom = np.zeros(len(records))
    for name in TIMING_PARTS:
        values = np.array([p[name] for p in parts])
        ax.bar(rounds, values, bottom=bottom, label=name)
        bottom += values
    _round_axis(ax)
    ax.set_ylabel("seconds")
    ax.set_title("time per round")
    ax.legend(fontsize="small")
    return _save(fig, path, "Time per round by phase (stacked)")


def plot_cross_site(cs: CrossSite, path: Path) -> Figure:
    fig = _figure(max(5.0, 1.6 * len(cs.columns) + 2), max(3.5, 0.6 * len(cs.rows) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(cs.accuracy), cmap="viridis", vmin=0, vmax=1,
                   aspect="auto")
    ax.set_xticks(range(len(cs.columns)), cs.labels, rotation=20, ha="right")
    ax.set_yticks(range(len(cs.rows)), cs.rows)
    for (i, j), v in np.ndenumerate(cs.accuracy):
        text = "n/a" if np.isnan(v) else f"{v:.2f}\n(bal {cs.balanced_accuracy[i, j]:.2f})"
        ax.text(j, i, text, ha="center", va="center", fontsize="small",
                color="black" if not np.isnan(v) and v > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_xlabel("validation set")
    ax.set_ylabel("model")
    ax.set_title("cross-site accuracy (balanced accuracy)")
    return _save(fig, path, "Cross-site validation: accuracy and balanced accuracy")


# ---- sections -----------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def headline_alerts(leak: Leakage, flagged: bool) -> list[Text]:
    """The failed checks, repeated at the top: a reader who stops at the summary must see them."""
    alerts = []
    if leak.shared:
        alerts.append(Text(f"LEAKAGE: {leak.shared} image(s) shared between train/val/test "
                           f"(see {TITLES['checks']}).", alert=True))
    if flagged:
        alerts.append(Text(f"SHORTCUT RISK: the model is not {SHORTCUT_MARGIN:.2f} balanced "
                           f"accuracy above a mean-colour baseline (see {TITLES['checks']}).",
                           alert=True))
    return alerts


def summary_section(run: Run, alerts: list[Text] | None = None) -> Section:
    c, p = run.config, run.config.data.partition
    partition = p.scheme + (f" (alpha {p.alpha})" if p.scheme == "dirichlet" else "") + (
        f" (column {p.group_column})" if p.scheme == "by-group" else "")
    failures = sum(len(r.get("failures", [])) for r in run.records)
    rows = [
        ["run", run.name],
        ["backbone", c.model.backbone + (" (pretrained)" if c.model.pretrained else "")
         + (" (dp-safe)" if c.model.dp_safe else "")],
        ["strategy", c.federation.strategy.name],
        ["hospitals", f"{c.federation.hospitals} ({', '.join(run.hospitals)})"],
        ["rounds", f"{len(run.records)} run of {c.federation.rounds} configured"],
        ["local epochs / batch / lr", f"{c.training.local_epochs} / {c.training.batch_size} / "
                                      f"{c.training.lr:g}"],
        ["image size", f"{input_size(c)} px"],
        ["partition", partition],
        ["data source", c.data.source],
        ["stop reason", run.final.get("stop_reason", "not finished (no metrics.json)")],
        ["best round", _fmt(run.final.get("best_round"))],
        ["failed hospital-rounds", str(failures)],
    ]
    return Section(TITLES["summary"], [*(alerts or []), Table(["item", "value"], rows)])


def _labels_of(path: Path) -> dict[str, int]:
    labels = pq.read_table(path, columns=["label"]).column(0).to_pylist()
    return {c: labels.count(c) for c in CLASSES}


def data_section(run: Run) -> Section:
    """Class counts per shard (shards.json), plus each hospital's local validation slice."""
    counts = dict(run.shards.counts)
    for h, file in sorted(run.shards.local_val.items()):
        counts.setdefault(f"{h} (local val)", _labels_of(run.shards.path(file)))
    rows = [[name, *(str(c.get(k, 0)) for k in CLASSES), str(sum(c.values()))]
            for name, c in counts.items()]
    return Section(TITLES["data"], [Table(["shard", *CLASSES, "total"], rows)])


def curves_section(run: Run, out: Path) -> Section:
    if not run.records:
        return Section(TITLES["curves"], [Text("No rounds recorded (metrics.jsonl is empty).")])
    return Section(TITLES["curves"], [plot_curves(run, out / "curves.png")])


def evaluation_section(run: Run, metrics: dict, pred: engine.Predictions, out: Path) -> Section:
    """Re-predicted test metrics: the ROC curves need probabilities, which metrics.json lacks."""
    blocks: list[Block] = [Text(
        f"Model: {run_weights(run.dir).relative_to(run.dir)}; {metrics['n']} test images. "
        f"Accuracy {_fmt(metrics['accuracy'])}, balanced accuracy "
        f"{_fmt(metrics['balanced_accuracy'])}, macro F1 {_fmt(metrics['macro_f1'])}, "
        f"ROC-AUC (macro) {_fmt(metrics['roc_auc_macro'])}, "
        f"Cohen's kappa {_fmt(metrics['kappa'])}.")]
    blocks.append(plot_confusion(np.array(metrics["confusion_matrix"]), out / "confusion_test.png"))
    blocks.append(plot_roc(pred.labels, pred.probs, out / "roc_test.png"))
    rows = [[name, _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), str(m["support"]),
             _fmt(m["roc_auc"])] for name, m in metrics["per_class"].items()]
    blocks.append(Table(["class", "precision", "recall", "F1", "support", "ROC-AUC"], rows))
    recorded = run.final.get("test", {}).get("accuracy")
    if recorded is not None and abs(recorded - metrics["accuracy"]) > 1e-6:
        blocks.append(Text(f"metrics.json recorded test accuracy {recorded:.4f}, the model "
                           f"on disk gives {metrics['accuracy']:.4f}: the weights changed after "
                           f"the run finished.", alert=True))
    return Section(TITLES["test"], blocks)


def privacy_section(run: Run, out: Path) -> Section:
    """The ledgers' final epsilon (from metrics.json's privacy object, which counts every
    release, a late one too), the privacy unit, and a warning when the noise was seeded."""
    privacy = run.final.get("privacy") or {}
    has_eps = any("epsilon" in h for r in run.records for h in r.get("hospitals", {}).values())
    ledgers = privacy.get("hospitals") or {}
    if not has_eps and not ledgers and not privacy.get("client_level"):
        return Section(TITLES["privacy"], [Text(
            "Differential privacy was off: no round recorded an epsilon.")])
    blocks: list = []
    if privacy.get("warning"):
        blocks.append(Text(privacy["warning"], alert=True))
    if ledgers:
        blocks.append(Text(f"Privacy unit: {privacy.get('unit')}; accountant "
                           f"{privacy.get('accountant')}; epsilon from each hospital's own "
                           "ledger at the end of the run."))
        rows = [[h, _fmt(float(m["epsilon"]), 3), f"{m['delta']:.2g}", str(m["dp_steps"]),
                 _fmt(float(m["noise_multiplier"]), 3), _fmt(float(m["sample_rate"]), 4)]
                for h, m in sorted(ledgers.items())]
        blocks.append(Table(["hospital", "final epsilon", "delta", "DP steps", "noise",
                             "sample rate"], rows))
    elif has_eps:
        last: dict[str, float] = {}
        for r in run.records:
            for h, m in r.get("hospitals", {}).items():
                if "epsilon" in m:
                    last[h] = m["epsilon"]
        blocks.append(Table(["hospital", "final epsilon"],
                            [[h, _fmt(float(e), 3)] for h, e in sorted(last.items())]))
    server = privacy.get("client_level")
    if server:
        eps = server.get("epsilon")
        blocks.append(Text(f"Client-level DP (DP-FedAvg, unit: hospital): epsilon "
                           f"{'unbounded (no noise)' if eps is None else f'{eps:.3f}'} at delta "
                           f"{server['delta']:.2g} after {server['rounds']} rounds."))
    if has_eps:
        blocks.insert(0, plot_epsilon(run, out / "epsilon.png"))
    return Section(TITLES["privacy"], blocks)


def timing_section(run: Run, out: Path) -> Section:
    if not run.records:
        return Section(TITLES["timing"], [Text("No rounds recorded.")])
    rows = [[str(r["round"]), *(_fmt(v, 2) for v in round_timing(r).values())]
            for r in run.records]
    note = Text("Local training is the slowest hospital of the round; gather is the rest of "
                "the fit phase (transfer, scheduling); broadcast is measured on Ray only.")
    return Section(TITLES["timing"], [plot_timing(run.records, out / "timing.png"), note,
                                      Table(["round", *TIMING_PARTS], rows)])


def _pick_examples(labels: np.ndarray, n: int) -> np.ndarray:
    """Round-robin over classes so every class present shows up before any repeats."""
    by_class = [list(np.flatnonzero(labels == c)) for c in range(len(CLASSES))]
    picked: list[int] = []
    while len(picked) < min(n, len(labels)):
        for rows in by_class:
            if rows and len(picked) < n:
                picked.append(int(rows.pop(0)))
    return np.array(picked, dtype=np.int64)


def plot_explanations(images: np.ndarray, overlays: list[np.ndarray], titles: list[str],
                      path: Path) -> Figure:
    """Pairs of (image, heat-map overlay), four pairs per row."""
    n = len(overlays)
    per_row = min(4, n)
    rows = -(-n // per_row)
    fig = _figure(2.2 * 2 * per_row, 2.5 * rows)
    axes = np.atleast_1d(fig.subplots(rows, 2 * per_row)).reshape(rows, 2 * per_row)
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(n):
        row, col = divmod(k, per_row)
        left, right = axes[row, 2 * col], axes[row, 2 * col + 1]
        left.imshow(images[k])
        left.set_title(titles[k], fontsize="small")
        right.imshow(overlays[k])
        right.set_title("explanation", fontsize="small")
    return _save(fig, path, "Example explanations on test images (Grad-CAM)")


def explanations_section(ev: Evaluator, model: nn.Module, pred: engine.Predictions, out: Path,
                         n: int) -> Section:
    """Grad-CAM overlays for a few test images, if fedray.explain is available.

    Imported lazily: the report must still build where the explanation module (or a backbone
    it does not support) is missing; the section then says why.
    """
    title = TITLES["explanations"]
    if n <= 0:
        return Section(title, [Text("Explanations unavailable: none requested.")])
    try:
        from fedray import explain
    except ImportError as exc:
        return Section(title, [Text(f"Explanations unavailable: {exc}.")])
    dataset = ev.dataset(ev.run.shards.test)
    idx = _pick_examples(pred.labels, n)
    raw = dataset.images[idx]
    inputs = torch.stack([dataset.transform(img) for img in raw]).to(ev.device)
    predicted = pred.probs.argmax(1)[idx]
    try:
        heat = explain.explain(model, inputs, targets=None, method="gradcam",
                               backbone=ev.run.config.model.backbone)
        images = raw.permute(0, 2, 3, 1).numpy()
        overlays = [explain.overlay(images[k], np.asarray(heat[k])) for k in range(len(idx))]
    except Exception as exc:  # noqa: BLE001 - a report section must not sink the report
        return Section(title, [Text(f"Explanations unavailable: {type(exc).__name__}: {exc}")])
    titles = [f"true {CLASSES[pred.labels[i]]} / pred {CLASSES[predicted[k]]} "
              f"{pred.probs[i, predicted[k]]:.2f}" for k, i in enumerate(idx)]
    return Section(title, [plot_explanations(images, overlays, titles, out / "explanations.png")])


def cross_site_section(cs: CrossSite, out: Path) -> Section:
    if not cs.columns:
        return Section(TITLES["cross_site"], [Text(
            "Cross-site validation unavailable: the run has no validation split.")])
    rows = [[name, *(f"{_fmt(cs.accuracy[i, j], 3)} / {_fmt(cs.balanced_accuracy[i, j], 3)}"
                     for j in range(len(cs.columns)))] for i, name in enumerate(cs.rows)]
    blocks: list[Block] = [
        Text("Rows: the global model, then each hospital's last local model; columns: each "
             "hospital's own validation slice and the whole validation split. "
             "Cells: accuracy / balanced accuracy."),
        plot_cross_site(cs, out / "cross_site.png"),
        Table(["model", *cs.labels], rows),
    ]
    missing = [r for i, r in enumerate(cs.rows) if np.isnan(cs.accuracy[i]).all()]
    if missing:
        blocks.append(Text(f"No weights for: {', '.join(missing)} (runs before local models "
                           f"were saved, or a hospital that never finished a round)."))
    return Section(TITLES["cross_site"], blocks)


def checks_section(leak: Leakage, baseline: dict[str, float], model: dict) -> Section:
    pairs = list(leak.pairs.items())
    table = Table(["splits", "shared images (sha256)"],
                  [[k, str(v)] for k, v in pairs] + [["any two splits", str(leak.shared)]],
                  {(i, 1) for i, (_, v) in enumerate(pairs) if v} | (
                      {(len(pairs), 1)} if leak.shared else set()))
    blocks: list[Block] = [table]
    if leak.shared:
        blocks.append(Text(f"LEAKAGE: {leak.shared} image(s) appear in more than one of "
                           f"train/val/test; the test metrics above are optimistic.", alert=True))
    else:
        blocks.append(Text("No image is shared between train, val and test (sha256 of the "
                           "stored bytes, recomputed now)."))
    if leak.stale_hashes:
        blocks.append(Text(f"{leak.stale_hashes} row(s) carry a sha256 that does not match "
                           f"their bytes: the shards were modified after preparation.", alert=True))
    blocks.append(Text(f"Between hospitals' training shards: {leak.between_hospitals} shared "
                       f"image(s). Recorded at preparation (leakage.json): "
                       f"{json.dumps(leak.recorded) if leak.recorded else 'not available'}."))
    flagged = shortcut_flag(model["balanced_accuracy"], baseline["balanced_accuracy"])
    blocks.append(Table(["classifier (test)", "accuracy", "balanced accuracy"], [
        ["model", _fmt(model["accuracy"]), _fmt(model["balanced_accuracy"])],
        ["mean-colour baseline", _fmt(baseline["accuracy"]), _fmt(baseline["balanced_accuracy"])],
    ], {(0, 2)} if flagged else set()))
    if flagged:
        blocks.append(Text(
            f"SHORTCUT RISK: the model's balanced accuracy is not at least {SHORTCUT_MARGIN:.2f} "
            f"above a logistic regression on mean image colour; it may be reading stain colour "
            f"rather than cell morphology (or it has not learned yet).", alert=True))
    else:
        blocks.append(Text(f"The model beats the mean-colour baseline by at least "
                           f"{SHORTCUT_MARGIN:.2f} balanced accuracy."))
    return Section(TITLES["checks"], blocks)


# ---- rendering ----------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;
text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}
.alert{color:#b00000;font-weight:bold}td.alert{background:#ffe0e0}
figure{margin:1em 0}figcaption{color:#555;font-size:90%}img{max-width:100%}
"""


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        cls = ' class="alert"' if block.alert else ""
        return f"<p{cls}>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
        alert = ' class="alert"'
        body = "".join(
            "<tr>" + "".join(
                f"<td{alert if (i, j) in block.alert_cells else ''}>{html.escape(cell)}</td>"
                for j, cell in enumerate(row)) + "</tr>"
            for i, row in enumerate(block.rows))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    data = base64.b64encode(block.path.read_bytes()).decode("ascii")
    caption = html.escape(block.caption)
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"**⚠ {block.text}**" if block.alert else block.text
    if isinstance(block, Table):
        def cell(i: int, j: int, text: str) -> str:
            return f"**{_md_cell(text)}**" if (i, j) in block.alert_cells else _md_cell(text)
        lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                 "|" + "|".join("---" for _ in block.headers) + "|"]
        lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(row)) + " |"
                  for i, row in enumerate(block.rows)]
        return "\n".join(lines)
    return f"![{block.caption}]({block.path.name})"


def render_html(title: str, sections: Iterable[Section]) -> str:
    body = "".join(f"<section><h2>{html.escape(s.title)}</h2>"
                   + "".join(_html_block(b) for b in s.blocks) + "</section>" for s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def render_markdown(title: str, sections: Iterable[Section]) -> str:
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f"## {s.title}")
        parts.extend(_md_block(b) for b in s.blocks)
    return "\n\n".join(parts) + "\n"


def _write(out_dir: Path, stem: str, title: str, sections: list[Section]) -> tuple[Path, Path]:
    html_path, md_path = out_dir / f"{stem}.html", out_dir / f"{stem}.md"
    html_path.write_text(render_html(title, sections), encoding="utf-8")
    md_path.write_text(render_markdown(title, sections), encoding="utf-8")
    return html_path, md_path


REPORT_PNGS = ("curves.png", "confusion_test.png", "roc_test.png", "epsilon.png", "timing.png",
               "explanations.png", "cross_site.png", "overview.png")
OVERVIEW = ("curves.png", "confusion_test.png", "roc_test.png", "cross_site.png", "explanations.png")


def overview(out: Path, title: str) -> Path | None:
    """One picture of the report (curves, confusion, ROC, cross-site, explanations), for a
    README or a slide; made from the figures the report already drew."""
    panels = [out / name for name in OVERVIEW if (out / name).is_file()]
    if not panels:
        return None
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig = MplFigure(figsize=(14, 5 * rows), dpi=80)
    for i, path in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(Image.open(path).convert("RGB")))
        ax.set_axis_off()
    fig.suptitle(title, fontsize=16)
    fig.tight_layout()
    target = out / "overview.png"
    fig.savefig(target)
    return target


# ---- entry points -------------------------------------------------------------------------------
def build_report(run_dir: Path, out_dir: Path | None = None, *,
                 explanations: int = 8) -> tuple[Path, Path]:
    """Write report.html (self-contained), report.md, report.json and the PNGs; return the
    HTML and Markdown paths. `explanations` is how many test images get a Grad-CAM overlay."""
    run = Run.load(Path(run_dir))
    out = Path(out_dir) if out_dir is not None else run.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_PNGS:  # a rebuilt report must not keep an old run's pictures around
        (out / name).unlink(missing_ok=True)
    ev = Evaluator(run)
    model = ev.model(run_weights(run.dir))
    pred = ev.predict(model, run.shards.test)
    metrics = classification_metrics(pred.labels, pred.probs, list(CLASSES))
    cs = cross_site_matrix(run, ev)
    leak = leakage_check(run.shards)
    baseline = mean_colour_baseline(run.shards)
    flagged = shortcut_flag(metrics["balanced_accuracy"], baseline["balanced_accuracy"])
    sections = [
        summary_section(run, headline_alerts(leak, flagged)), data_section(run),
        curves_section(run, out),
        evaluation_section(run, metrics, pred, out), privacy_section(run, out),
        timing_section(run, out), explanations_section(ev, model, pred, out, explanations),
        cross_site_section(cs, out), checks_section(leak, baseline, metrics),
    ]
    _write_json(out / "report.json", run, metrics, cs, leak, baseline)
    overview(out, f"fedray report: {run.name}  (test accuracy {metrics['accuracy']:.3f})")
    return _write(out, "report", f"fedray report: {run.name}", sections)


def _nan_to_none(a: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in a]


def _write_json(path: Path, run: Run, metrics: dict, cs: CrossSite, leak: Leakage,
                baseline: dict[str, float]) -> None:
    """The checked numbers, machine-readable, so CI can fail on leakage or a shortcut."""
    data = {
        "run": run.name,
        "test": {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                         "roc_auc_macro", "kappa")},
        "cross_site": {"rows": cs.rows, "columns": cs.columns, "sizes": cs.sizes,
                       "accuracy": _nan_to_none(cs.accuracy),
                       "balanced_accuracy": _nan_to_none(cs.balanced_accuracy)},
        "leakage": {"pairs": leak.pairs, "shared": leak.shared,
                    "between_hospitals": leak.between_hospitals,
                    "stale_hashes": leak.stale_hashes, "recorded": leak.recorded},
        "mean_colour_baseline": baseline,
        "shortcut_flag": shortcut_flag(metrics["balanced_accuracy"],
                                       baseline["balanced_accuracy"]),
    }
    path.write_text(json.dumps(data, indent=2))


def _unique_names(runs: list[Run]) -> list[str]:
    """Run folder names, prefixed with their parent where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.dir.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


COMPARE_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "kappa")


def compare_table(runs: list[Run], names: list[str]) -> Table:
    rows = []
    for run, name in zip(runs, names):
        test = run.final.get("test", {})
        c = run.config
        rows.append([name, c.model.backbone, c.federation.strategy.name,
                     str(c.federation.hospitals), c.data.partition.scheme, str(len(run.records)),
                     _fmt(run.final.get("best_round")), *(_fmt(test.get(k)) for k in COMPARE_KEYS)])
    return Table(["run", "backbone", "strategy", "hospitals", "partition", "rounds", "best round",
                  *(f"test {k}" for k in COMPARE_KEYS)], rows)


def plot_compare(runs: list[Run], names: list[str], path: Path) -> Figure:
    fig = _figure(12, 4)
    axes = fig.subplots(1, 3)
    for run, name in zip(runs, names):
        with_val = [r for r in run.records if r.get("val")]
        for ax, key in zip(axes, ("loss", "accuracy", "balanced_accuracy")):
            ax.plot(_rounds(with_val), [r["val"][key] for r in with_val], marker="o", label=name)
    for ax, key in zip(axes, ("loss", "accuracy", "balanced_accuracy")):
        ax.set_title(f"validation {key.replace('_', ' ')}")
        _round_axis(ax)
    axes[0].legend(fontsize="small")
    return _save(fig, path, "Global validation curves of every run, overlaid")


def compare_runs(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Side-by-side final test metrics and overlaid validation curves of several runs.

    Reads only config, metrics.json and metrics.jsonl (no model is run), so it is quick even
    for many large runs; test metrics are the ones recorded when each run finished.
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run folder")
    runs = [Run.load(Path(d)) for d in run_dirs]
    names = _unique_names(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unfinished = [n for n, r in zip(names, runs) if not r.final]
    blocks: list[Block] = [compare_table(runs, names),
                           plot_compare(runs, names, out / "compare_curves.png")]
    if unfinished:
        blocks.append(Text(f"Not finished (no metrics.json, no test metrics): "
                           f"{', '.join(unfinished)}.", alert=True))
    return _write(out, "compare", f"fedray comparison of {len(runs)} runs",
                  [Section("Runs side by side", blocks)])
