"""The out-of-distribution score a served prediction abstains on, and its calibration.

The score of an image is the distance from its L2-normalised feature vector (the input of the
classifier's last Linear layer) to the nearest class centroid of the validation images. In site
mode the validation images never leave their sites, so calibration is federated: each site
sends per-class feature sums and counts (the centroids are their pooled means), then a
histogram of its images' scores over fixed bins (the threshold is the pooled histogram's
quantile, rounded up to a bin edge). Counts and sums only: no image and no feature vector of
one image leaves a site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor, nn

SCORE_BINS = 4000
SCORE_MAX = 2.0  # unit vectors and centroids inside the unit ball: distances are at most 2


def last_linear(model: nn.Module) -> nn.Module:
    """The classifier's final Linear layer: its input is the feature vector OOD scores use."""
    from torch import nn

    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no Linear layer: no features to score")
    return linear[-1]


def logits_and_features(model: nn.Module, batch: Tensor) -> tuple[Tensor, Tensor]:
    """One forward pass of an eager model, keeping the input of its last Linear layer.

    The hook keeps only the features of this thread's pass: a service runs passes on one
    module from several threads at once, and each pass's hook fires in every one of them.
    """
    import threading

    seen: dict[str, Tensor] = {}
    caller = threading.get_ident()

    def keep(module, args) -> None:
        if threading.get_ident() == caller:
            seen["features"] = args[0]

    handle = last_linear(model).register_forward_pre_hook(keep)
    try:
        logits = model(batch)
    finally:
        handle.remove()
    return logits, seen["features"]


def ood_scores(features: Tensor, centroids: Tensor) -> Tensor:
    """Distance from each L2-normalised feature row to the nearest class centroid."""
    import torch

    unit = torch.nn.functional.normalize(features.float(), dim=1)
    return torch.cdist(unit, centroids.to(unit.device).float()).min(dim=1).values


def unit_features(model: nn.Module, dataset, batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """Normalised features and labels of a dataset, in eval mode without gradients."""
    import torch

    model.eval()
    features = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            batch = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size,
                                                                         len(dataset)))])
            device = next(model.parameters()).device
            features.append(logits_and_features(model, batch.to(device))[1].float().cpu())
    return torch.nn.functional.normalize(torch.cat(features), dim=1), dataset.labels


def class_sums(unit: Tensor, labels, classes: int) -> dict:
    """A site's first calibration message: per class, the sum of its images' unit features
    (`unit_features`) and their count."""
    sums = np.zeros((classes, unit.shape[1]), dtype=np.float64)
    counts = np.zeros(classes, dtype=np.int64)
    for c in range(classes):
        rows = unit[labels == c]
        sums[c] = rows.sum(dim=0).double().numpy()
        counts[c] = len(rows)
    return {"sums": sums.tolist(), "counts": counts.tolist()}


def centroids_from_sums(parts: list[dict]) -> tuple[np.ndarray, list[int]]:
    """Pooled class centroids (classes seen anywhere) and which classes they are."""
    sums = np.sum([np.asarray(p["sums"]) for p in parts], axis=0)
    counts = np.sum([np.asarray(p["counts"]) for p in parts], axis=0)
    present = [c for c in range(len(counts)) if counts[c] > 0]
    return (sums[present] / counts[present, None]).astype(np.float32), present


def score_histogram(unit: Tensor, centroids: np.ndarray) -> list[int]:
    """A site's second calibration message: its images' scores (from their unit features, the
    same ones the first message summed) as counts over fixed bins."""
    import torch

    scores = torch.cdist(unit, torch.from_numpy(np.array(centroids, dtype=np.float32))).min(dim=1).values.numpy()
    index = np.clip((scores / SCORE_MAX * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
    return np.bincount(index, minlength=SCORE_BINS).tolist()


def threshold_from_histograms(parts: list[list[int]], quantile: float) -> dict:
    """The abstain threshold (the quantile's bin, upper edge) and its false-abstain rate."""
    hist = np.sum([np.asarray(p) for p in parts], axis=0)
    total = int(hist.sum())
    cumulative = np.cumsum(hist)
    edges = np.linspace(0.0, SCORE_MAX, SCORE_BINS + 1)[1:]

    def at(q: float) -> float:
        return float(edges[int(np.searchsorted(cumulative, q * total, side="left"))])

    threshold = at(quantile)
    above = int(hist[edges > threshold].sum())
    return {"threshold": threshold, "validation_images": total,
            "false_abstain_rate": above / total if total else 0.0,
            "validation_scores": {"p50": at(0.5), "p95": at(0.95),
                                  "max": float(edges[np.flatnonzero(hist)[-1]]) if total else 0.0},
            "bins": SCORE_BINS}
