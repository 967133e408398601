"""Bootstrap intervals over seeds and test images, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from fedray.data.labels import CLASSES
from fedray.experiments import bootstrap
from fedray.metrics import metrics_from_stats


def _stats(cm: np.ndarray) -> dict:
    k = cm.shape[0]
    return {"confusion_matrix": cm.tolist(), "positives": np.zeros((k, 4)).tolist(),
            "negatives": np.zeros((k, 4)).tolist(), "loss_sum": 0.0, "n": int(cm.sum()),
            "bins": 4}


@pytest.mark.parametrize("seed", range(5))
def test_scores_are_the_runs_metrics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cms = {"a": rng.integers(0, 9, (4, 4)), "b": rng.integers(0, 9, (4, 4))}
    cms["b"][2] = 0  # a class absent at one site
    got = bootstrap.scores({"global": cms})
    pooled = metrics_from_stats(_stats(cms["a"] + cms["b"]), list(CLASSES))
    assert got["test_balanced_accuracy"] == pytest.approx(pooled["balanced_accuracy"])
    assert got["test_macro_f1"] == pytest.approx(pooled["macro_f1"])
    worst = min(metrics_from_stats(_stats(c), list(CLASSES))["balanced_accuracy"]
                for c in cms.values())
    assert got["worst_site_balanced_accuracy"] == pytest.approx(worst)


def test_local_only_scores_average_the_hospitals_and_split_own_from_other() -> None:
    eye, flat = np.eye(4, dtype=int) * 10, np.full((4, 4), 5)
    got = bootstrap.scores({"a": {"a": eye, "b": flat}, "b": {"a": flat, "b": flat}})
    assert got["own_site_balanced_accuracy"] == pytest.approx((1.0 + 0.25) / 2)
    assert got["other_site_balanced_accuracy"] == pytest.approx(0.25)
    pooled_a = bootstrap.balanced_accuracy(eye + flat)  # recall (10 + 5) / 30 per class
    assert got["test_balanced_accuracy"] == pytest.approx((pooled_a + 0.25) / 2)


def test_two_seeds_without_test_noise_span_the_two_seeds() -> None:
    """Huge test sets: each replicate's mean is a, (a + b) / 2 or b with probability 1/4, 1/2,
    1/4, so the 2.5th and 97.5th percentiles are a and b."""
    big = 10**9
    a = np.diag([big, big, big, big]) // 2 + np.full((4, 4), big // 6)  # recall 2/3 each
    b = np.diag([big] * 4)  # recall 1
    lo, hi = bootstrap.intervals([{"global": {"s": a}}, {"global": {"s": b}}])[
        "test_balanced_accuracy"]
    ba_a = float(bootstrap.balanced_accuracy(a))
    assert lo == pytest.approx(ba_a, abs=1e-4) and hi == pytest.approx(1.0, abs=1e-4)


def test_one_seed_interval_is_the_test_images_bootstrap() -> None:
    """One seed: the interval is that of redrawing each class's images, computed here by a
    plain loop over replicates with its own generator (agreement within Monte Carlo error)."""
    cm = np.array([[30, 5, 3, 2], [4, 20, 10, 6], [2, 9, 15, 4], [1, 3, 6, 25]])
    got = bootstrap.intervals([{"global": {"s": cm}}])["test_balanced_accuracy"]
    rng = np.random.default_rng(7)
    reps = []
    for _ in range(4000):
        drawn = np.stack([rng.multinomial(row.sum(), row / row.sum()) for row in cm])
        reps.append(np.mean(np.diag(drawn) / drawn.sum(1)))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert got == pytest.approx([lo, hi], abs=0.015)
    assert got[0] < float(bootstrap.balanced_accuracy(cm)) < got[1]


def test_intervals_are_reproducible_and_shrink_with_more_images() -> None:
    cm = np.array([[8, 2, 0, 0], [1, 7, 2, 0], [0, 3, 6, 1], [0, 0, 2, 8]])
    small = bootstrap.intervals([{"global": {"s": cm}}, {"global": {"s": cm}}])
    assert small == bootstrap.intervals([{"global": {"s": cm}}, {"global": {"s": cm}}])
    large = bootstrap.intervals([{"global": {"s": cm * 100}}, {"global": {"s": cm * 100}}])
    for key in small:
        assert large[key][1] - large[key][0] < (small[key][1] - small[key][0]) / 3
