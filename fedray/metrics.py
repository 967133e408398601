"""Classification metrics from probabilities, with scikit-learn; JSON-ready dictionaries."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro/weighted P/R/F1, ROC-AUC (OvR), kappa, confusion."""
    k = len(classes)
    pred = probs.argmax(1)
    idx = list(range(k))
    out: dict = {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "balanced_accuracy": _balanced_accuracy(labels, pred),
        "kappa": _safe(lambda: skm.cohen_kappa_score(labels, pred, labels=idx)),
        "confusion_matrix": skm.confusion_matrix(labels, pred, labels=idx).tolist(),
    }
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            labels, pred, labels=idx, average=avg, zero_division=0
        )
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
    p, r, f, s = skm.precision_recall_fscore_support(labels, pred, labels=idx, zero_division=0)
    aucs = _roc_auc_per_class(labels, probs, k)
    out["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
               "support": int(s[i]), "roc_auc": aucs[i]}
        for i, name in enumerate(classes)
    }
    present = [a for a in aucs if a is not None]
    out["roc_auc_macro"] = float(np.mean(present)) if present else None
    return out


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skm.balanced_accuracy_score(labels, pred))


def _roc_auc_per_class(labels: np.ndarray, probs: np.ndarray, k: int) -> list[float | None]:
    """One-vs-rest AUC per class; None where a class is absent (or alone) in the labels."""
    aucs: list[float | None] = []
    for c in range(k):
        positive = labels == c
        if positive.all() or not positive.any():
            aucs.append(None)
        else:
            aucs.append(float(skm.roc_auc_score(positive, probs[:, c])))
    return aucs


def _safe(fn) -> float | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = fn()
    return None if value is None or np.isnan(value) else float(value)


def format_table(results: dict[str, dict], keys: tuple[str, ...] = (
    "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "kappa")) -> str:
    """A plain text table: one row per metric, one column per split."""
    splits = list(results)
    lines = ["metric".ljust(20) + "".join(s.rjust(10) for s in splits)]
    for key in keys:
        cells = []
        for s in splits:
            v = results[s].get(key)
            cells.append(("-" if v is None else f"{v:.4f}").rjust(10))
        lines.append(key.ljust(20) + "".join(cells))
    return "\n".join(lines)
