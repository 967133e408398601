"""The report's sections, one function each, in the order the report shows them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from fedray import engine
from fedray.artifacts.run_folder import run_weights
from fedray.models import input_size
from fedray.data.labels import CLASSES
from fedray.report.checks import SHORTCUT_MARGIN, CrossSite, Leakage, shortcut_flag
from fedray.report.document import Block, Section, Table, Text, _fmt
from fedray.report.figures import (
    TIMING_PARTS,
    plot_confusion,
    plot_cross_site,
    plot_curves,
    plot_epsilon,
    plot_explanations,
    plot_roc,
    plot_timing,
    round_timing,
)
from fedray.report.run import Evaluator, Run


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
