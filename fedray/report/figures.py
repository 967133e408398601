"""The report's figures, each written as a PNG beside the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure as MplFigure
from PIL import Image

from fedray.data.labels import CLASSES
from fedray.report.checks import CrossSite
from fedray.report.document import Figure
from fedray.report.run import Run


DPI = 100


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
