"""Federated evaluation: metrics pooled from sites' sufficient statistics equal the metrics of
all their predictions in one place (scikit-learn), and ROC-AUC is exact up to a bin's width."""

from __future__ import annotations

import numpy as np
import pytest

from fedray.metrics import add_stats, classification_metrics, metrics_from_stats, sufficient_stats

CLASSES = ["Benign", "Early", "Pre", "Pro"]
EXACT = ("accuracy", "balanced_accuracy", "kappa", "macro_precision", "macro_recall", "macro_f1",
         "weighted_precision", "weighted_recall", "weighted_f1")


def site(rng: np.random.Generator, n: int, skew: float) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.choice(4, size=n, p=np.array([1, 1 + skew, 1, 1 + 2 * skew]) / (4 + 3 * skew))
    logits = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_metrics_equal_the_metrics_of_all_predictions(seed) -> None:
    rng = np.random.default_rng(seed)
    sites = [site(rng, n, skew) for n, skew in ((57, 0.0), (130, 2.0), (9, 5.0))]
    losses = [float(rng.uniform(10, 50)) for _ in sites]
    pooled = metrics_from_stats(add_stats([sufficient_stats(y, p, l, 4) for (y, p), l in
                                           zip(sites, losses)]), CLASSES)
    labels = np.concatenate([y for y, _ in sites])
    probs = np.concatenate([p for _, p in sites])
    central = classification_metrics(labels, probs, CLASSES)
    for key in EXACT:
        assert pooled[key] == pytest.approx(central[key], abs=1e-12), key
    assert pooled["confusion_matrix"] == central["confusion_matrix"]
    assert pooled["n"] == len(labels)
    assert pooled["loss"] == pytest.approx(sum(losses) / len(labels))
    # histogram AUC: within the share of positive/negative pairs that can share a bin
    assert pooled["roc_auc_macro"] == pytest.approx(central["roc_auc_macro"], abs=2e-3)
    for name in CLASSES:
        assert pooled["per_class"][name]["support"] == central["per_class"][name]["support"]


def test_auc_is_exact_when_no_two_scores_share_a_bin() -> None:
    bins = 10
    labels = np.array([0, 1, 0, 1, 1, 0])
    score = (np.array([0, 1, 3, 5, 8, 9]) + 0.5) / bins  # one score per bin
    probs = np.stack([score, 1 - score, np.zeros(6), np.zeros(6)], 1)
    pooled = metrics_from_stats(sufficient_stats(labels, probs, 0.0, 4, bins=bins), CLASSES)
    central = classification_metrics(labels, probs, CLASSES)
    assert pooled["per_class"]["Benign"]["roc_auc"] == pytest.approx(
        central["per_class"]["Benign"]["roc_auc"], abs=1e-12)
    assert pooled["per_class"]["Pre"]["roc_auc"] is None  # absent class


def test_sites_with_different_bins_do_not_pool() -> None:
    y, p = site(np.random.default_rng(0), 10, 0.0)
    with pytest.raises(ValueError, match="bins"):
        add_stats([sufficient_stats(y, p, 0, 4, bins=10), sufficient_stats(y, p, 0, 4, bins=20)])
