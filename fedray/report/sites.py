"""The report of a site-mode run, from its folder alone: the sites kept their images, so every
figure comes from the counts they sent (metrics.json's pooled and per-site metrics, the pooled
sufficient statistics, data/sites.json), never from a prediction made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedray.data.labels import CLASSES
from fedray.artifacts import run_folder as rf
from fedray.report.document import Block, Figure, Section, Table, Text, _write
from fedray.report.figures import _figure, _save, overview, plot_confusion
from fedray.report.run import Run
from fedray.report.sections import (
    TITLES,
    _fmt,
    curves_section,
    privacy_section,
    summary_section,
    timing_section,
)


def plot_roc_from_stats(stats: dict, path: Path) -> Figure:
    """One-vs-rest ROC per class from the pooled score histograms (one point per bin edge)."""
    fig = _figure(6, 5)
    ax = fig.subplots()
    for c, name in enumerate(CLASSES):
        pos = np.asarray(stats["positives"][c], dtype=float)[::-1].cumsum()
        neg = np.asarray(stats["negatives"][c], dtype=float)[::-1].cumsum()
        if not pos[-1] or not neg[-1]:
            ax.plot([], [], label=f"{name} (not in test)")
            continue
        tpr, fpr = np.r_[0.0, pos / pos[-1]], np.r_[0.0, neg / neg[-1]]
        ax.plot(fpr, tpr, label=f"{name} AUC {np.trapezoid(tpr, fpr):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC one-vs-rest (pooled local test splits, {stats['bins']} score bins)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path, "ROC curves per class from the sites' pooled score histograms")


def data_section(run: Run) -> Section:
    path = run.dir / rf.DATA / rf.SITE_COUNTS
    sites = json.loads(path.read_text())["sites"] if path.is_file() else {}
    rows = []
    for name, splits in sorted(sites.items()):
        for split, counts in (splits or {}).items():
            rows.append([f"{name} {split}", *(str(counts.get(k, "-")) for k in CLASSES),
                         str(sum(counts.values()))])
    text = Text("Each hospital read, split (patients and identical images kept on one side) and "
                "evaluated its own folder; these are the counts it sent.")
    return Section(TITLES["data"], [text, Table(["site split", *CLASSES, "total"], rows)])


def evaluation_section(run: Run, out: Path) -> Section:
    test = run.final.get("test") or {}
    if not test:
        return Section(TITLES["test"], [Text("No test evaluation (no metrics.json).")])
    blocks: list[Block] = [Text(
        f"Federated evaluation of the best model (round {run.final.get('best_round')}) on the "
        f"sites' local test splits, {test['n']} images in all, pooled exactly from the counts "
        f"each site sent. Accuracy {_fmt(test['accuracy'])}, balanced accuracy "
        f"{_fmt(test['balanced_accuracy'])}, macro F1 {_fmt(test['macro_f1'])}, ROC-AUC "
        f"(macro, {test.get('roc_auc_bins')} score bins) {_fmt(test['roc_auc_macro'])}, "
        f"Cohen's kappa {_fmt(test['kappa'])}.")]
    blocks.append(plot_confusion(np.array(test["confusion_matrix"]), out / "confusion_test.png"))
    if test.get("stats"):
        blocks.append(plot_roc_from_stats(test["stats"], out / "roc_test.png"))
    rows = [[name, _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), str(m["support"]),
             _fmt(m["roc_auc"])] for name, m in test["per_class"].items()]
    blocks.append(Table(["class", "precision", "recall", "F1", "support", "ROC-AUC"], rows))
    return Section(TITLES["test"], blocks)


def sites_section(run: Run) -> Section:
    sites = run.final.get("sites") or {}
    rows = [[h, str(m.get("test", {}).get("n", "-")),
             _fmt(m.get("test", {}).get("accuracy")), _fmt(m.get("test", {}).get("balanced_accuracy")),
             _fmt(m.get("val", {}).get("balanced_accuracy"))] for h, m in sorted(sites.items())]
    blocks: list[Block] = [Table(["site", "test images", "test accuracy", "test balanced acc.",
                                  "val balanced acc."], rows)]
    worst = run.final.get("worst_site")
    if worst:
        blocks.append(Text(f"Worst site: {worst['hospital']}, test balanced accuracy "
                           f"{_fmt(worst['balanced_accuracy'])}."))
    duplicates = run.final.get("cross_site_duplicates")
    if duplicates:
        blocks.append(Text(f"Cross-site duplicate check ran (sha256 only, over "
                           f"{', '.join(duplicates['sites'])}): {duplicates['duplicates']} "
                           f"image(s) held by more than one site.",
                           alert=bool(duplicates["duplicates"])))
    else:
        blocks.append(Text("Cross-site duplicate check did not run "
                           "(data.cross_site_duplicates is off)."))
    return Section("Per-site results", blocks)


def build_site_report(run: Run, out: Path) -> tuple[Path, Path]:
    sections = [summary_section(run), data_section(run), curves_section(run, out),
                evaluation_section(run, out), sites_section(run), privacy_section(run, out),
                timing_section(run, out)]
    test = run.final.get("test") or {}
    data = {"run": run.name, "site_mode": True,
            "test": {k: test.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                              "roc_auc_macro", "kappa")},
            "sites": {h: {s: {k: m.get(s, {}).get(k) for k in ("n", "accuracy",
                                                               "balanced_accuracy")}
                          for s in ("val", "test")}
                      for h, m in (run.final.get("sites") or {}).items()},
            "worst_site": run.final.get("worst_site"),
            "cross_site_duplicates": run.final.get("cross_site_duplicates")}
    (out / "report.json").write_text(json.dumps(data, indent=2))
    accuracy = test.get("accuracy")
    overview(out, f"fedray report: {run.name}" + (f"  (test accuracy {accuracy:.3f})"
                                                  if accuracy is not None else ""))
    return _write(out, "report", f"fedray report: {run.name}", sections)
