"""Classification metrics from probabilities, with scikit-learn; JSON-ready dictionaries."""

from __future__ import annotations

import warnings

import numpy as np


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro/weighted P/R/F1, ROC-AUC (OvR), kappa, confusion."""
    from sklearn import metrics as skm  # scikit-learn loads only where predictions are scored

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
    from sklearn import metrics as skm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skm.balanced_accuracy_score(labels, pred))


def _roc_auc_per_class(labels: np.ndarray, probs: np.ndarray, k: int) -> list[float | None]:
    """One-vs-rest AUC per class; None where a class is absent (or alone) in the labels."""
    from sklearn import metrics as skm

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


# ---- federated evaluation: metrics pooled exactly from each site's sufficient statistics ----

SCORE_BINS = 1000  # per-class score histograms; ROC-AUC from them is exact up to ties in a bin


def sufficient_stats(labels: np.ndarray, probs: np.ndarray, loss_sum: float, k: int,
                     bins: int = SCORE_BINS) -> dict:
    """What one site sends instead of predictions: the loss sum and count, the confusion
    matrix, and per class the histograms of that class's score among its positives and its
    negatives over `bins` fixed bins of [0, 1]. Counts only: no image, label or score leaves."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(labels), k)
    confusion = np.zeros((k, k), dtype=np.int64)
    if len(labels):
        np.add.at(confusion, (labels, probs.argmax(1)), 1)
    index = np.clip((probs * bins).astype(np.int64), 0, bins - 1)
    positives = np.zeros((k, bins), dtype=np.int64)
    negatives = np.zeros((k, bins), dtype=np.int64)
    for c in range(k):
        is_c = labels == c
        positives[c] = np.bincount(index[is_c, c], minlength=bins)
        negatives[c] = np.bincount(index[~is_c, c], minlength=bins)
    return {"n": int(len(labels)), "loss_sum": float(loss_sum), "bins": bins,
            "confusion_matrix": confusion.tolist(), "positives": positives.tolist(),
            "negatives": negatives.tolist()}


def add_stats(parts: list[dict]) -> dict:
    """The sum of several sites' sufficient statistics (all with the same bins)."""
    if not parts:
        raise ValueError("no sufficient statistics to pool")
    bins = {p["bins"] for p in parts}
    if len(bins) != 1:
        raise ValueError(f"sites used different score bins: {sorted(bins)}")
    total = {"n": sum(p["n"] for p in parts), "loss_sum": sum(p["loss_sum"] for p in parts),
             "bins": bins.pop()}
    for key in ("confusion_matrix", "positives", "negatives"):
        total[key] = np.sum([np.asarray(p[key], dtype=np.int64) for p in parts], axis=0).tolist()
    return total


def _auc_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """One-vs-rest ROC-AUC: P(score of a positive > a negative's), ties (a shared bin) half."""
    n_pos, n_neg = positives.sum(), negatives.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.concatenate([[0], np.cumsum(negatives)[:-1]])
    return float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))


def metrics_from_stats(stats: dict, classes: list[str]) -> dict:
    """The same metrics as `classification_metrics`, computed exactly from pooled sufficient
    statistics (ROC-AUC from the score histograms, `roc_auc_bins` of them) plus `loss`."""
    k = len(classes)
    cm = np.asarray(stats["confusion_matrix"], dtype=np.float64).reshape(k, k)
    n = cm.sum()
    support, predicted, correct = cm.sum(1), cm.sum(0), np.diag(cm)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, correct / support, 0.0)
        precision = np.where(predicted > 0, correct / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    expected = (support * predicted).sum() / n**2 if n else 0.0
    observed = correct.sum() / n if n else 0.0
    kappa = None if not n or expected == 1 else float((observed - expected) / (1 - expected))
    weights = support / n if n else np.zeros(k)
    positives = np.asarray(stats["positives"], dtype=np.float64)
    negatives = np.asarray(stats["negatives"], dtype=np.float64)
    aucs = [_auc_from_histograms(positives[c], negatives[c]) for c in range(k)]
    out: dict = {
        "n": int(n), "accuracy": float(observed),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "kappa": kappa, "confusion_matrix": cm.astype(int).tolist(),
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()), "weighted_precision": float((precision * weights).sum()),
        "weighted_recall": float((recall * weights).sum()),
        "weighted_f1": float((f1 * weights).sum()),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i]), "roc_auc": aucs[i]}
                      for i, name in enumerate(classes)},
        "loss": stats["loss_sum"] / max(stats["n"], 1), "roc_auc_bins": int(stats["bins"]),
    }
    known = [a for a in aucs if a is not None]
    out["roc_auc_macro"] = float(np.mean(known)) if known else None
    return out
