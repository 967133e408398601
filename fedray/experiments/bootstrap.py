"""Percentile bootstrap intervals for a comparison arm, over seeds and test images.

What an arm's score depends on: the training run (its seed) and the test images it was scored
on. One replicate redraws both: n seeds drawn with replacement from the arm's n seeds, and for
each drawn seed every site's test images again, within each true class, from the confusion
matrix that site sent (multinomial on each row: the images of a class redrawn with replacement,
their predictions kept). The arm's scores are recomputed from the redrawn counts exactly as
the run computed them (pooled over sites, worst site, per model), averaged over the drawn seeds;
the interval is the 2.5th and 97.5th percentile of `REPLICATES` replicates.

Only counts are used, never predictions, so the intervals come from what sites already send.
Two limits, stated with every interval: images of one patient are redrawn as if independent
(the sites send no per-patient counts), which narrows the test-set part; and with two or three
seeds the seed part can only show the spread those seeds had. A Student t interval over seeds
(`ci95_t`, in every summary beside this one) is far wider with few seeds (t = 12.7 for two).

An evaluation is `{model: {site: confusion matrix}}`: one model (`"global"`) for a federated or
pooled arm, one per hospital for local-only (its own model scored at every site).
"""

from __future__ import annotations

import numpy as np

REPLICATES = 2000
SEED = 20231


def scores(cms: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """An evaluation's scores from confusion matrices with any leading batch shape
    (`[..., k, k]`): pooled over sites and averaged over models, as compare reports them."""
    models = sorted(cms)
    sites = sorted(cms[models[0]])
    pooled_ba, pooled_f1, worst, own, other = [], [], [], [], []
    for m in models:
        per_site = {s: balanced_accuracy(cms[m][s]) for s in sites}
        pooled = sum(cms[m][s] for s in sites)
        pooled_ba.append(balanced_accuracy(pooled))
        pooled_f1.append(macro_f1(pooled))
        worst.append(np.min(np.stack([per_site[s] for s in sites]), axis=0))
        if m in per_site:
            own.append(per_site[m])
            other.extend(per_site[s] for s in sites if s != m)
    out = {"test_balanced_accuracy": np.mean(pooled_ba, axis=0),
           "test_macro_f1": np.mean(pooled_f1, axis=0),
           "worst_site_balanced_accuracy": np.mean(worst, axis=0)}
    if own:
        out["own_site_balanced_accuracy"] = np.mean(own, axis=0)
    if other:
        out["other_site_balanced_accuracy"] = np.mean(other, axis=0)
    return out


def balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present (fedray.metrics.metrics_from_stats), batched."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(-1)
    present = support > 0
    recall = np.divide(np.diagonal(cm, axis1=-2, axis2=-1), support,
                       out=np.zeros_like(support), where=present)
    return (recall * present).sum(-1) / np.maximum(present.sum(-1), 1)


def macro_f1(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over all classes, 0 where undefined (fedray.metrics.metrics_from_stats)."""
    cm = np.asarray(cm, dtype=np.float64)
    correct = np.diagonal(cm, axis1=-2, axis2=-1)
    denominator = cm.sum(-1) + cm.sum(-2)
    f1 = np.divide(2 * correct, denominator, out=np.zeros_like(correct), where=denominator > 0)
    return f1.mean(-1)


def redraw(cm: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """`draws` confusion matrices, each row redrawn: multinomial(row total, row / row total)."""
    cm = np.asarray(cm, dtype=np.int64)
    totals = cm.sum(1)
    p = np.divide(cm, totals[:, None], out=np.full(cm.shape, 1.0 / cm.shape[1]),
                  where=totals[:, None] > 0)
    return rng.multinomial(totals, p, size=(draws, cm.shape[0]))


def intervals(evaluations: list[dict[str, dict[str, list]]], replicates: int = REPLICATES,
              seed: int = SEED) -> dict[str, list[float]]:
    """{score: [lo, hi]}: the arm's 95% percentile bootstrap intervals over its seeds'
    evaluations (one per seed) and their test images; reproducible for a given `seed`."""
    rng = np.random.default_rng(seed)
    n = len(evaluations)
    picks = rng.integers(0, n, size=(replicates, n))  # the seeds each replicate draws
    per_seed = []  # per seed: {score: [replicates, n]} from independent redraws
    for evaluation in evaluations:
        drawn = {m: {s: redraw(cm, replicates * n, rng).reshape(replicates, n, *np.shape(cm))
                     for s, cm in sites.items()} for m, sites in evaluation.items()}
        per_seed.append(scores(drawn))
    out = {}
    for key in per_seed[0]:
        stacked = np.stack([s[key] for s in per_seed])  # [seeds, replicates, n]
        chosen = np.take_along_axis(stacked, picks[None], axis=0)[0]  # [replicates, n]
        lo, hi = np.percentile(chosen.mean(1), [2.5, 97.5])
        out[key] = [float(lo), float(hi)]
    return out
