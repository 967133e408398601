"""Aggregation math as pure numpy functions, testable against np.average."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def weighted_average(updates: Sequence[tuple[dict[str, np.ndarray], int]]) -> OrderedDict:
    """Per-tensor average weighted by sample count, summed in the order given.

    Callers pass updates sorted by hospital so that the floating-point sum, and thus the
    result, is the same on every run. Integer tensors (BatchNorm's step counters) are averaged
    in float64 and rounded back to their dtype.
    """
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    total = float(sum(n for _, n in updates))
    if total <= 0:
        raise ValueError("sample counts must add up to a positive number")
    names = list(updates[0][0].keys())
    for weights, _ in updates[1:]:
        if list(weights.keys()) != names:
            raise ValueError("updates disagree on parameter names")
    out: OrderedDict = OrderedDict()
    for name in names:
        ref = np.asarray(updates[0][0][name])
        acc = np.zeros(ref.shape, dtype=np.float64)
        for weights, n in updates:
            acc += np.asarray(weights[name], dtype=np.float64) * (n / total)
        if np.issubdtype(ref.dtype, np.integer):
            out[name] = np.rint(acc).astype(ref.dtype)
        else:
            out[name] = acc.astype(ref.dtype)
    return out


def _stacked(updates: Sequence[dict[str, np.ndarray]], what: str) -> tuple[list[str], dict]:
    """Names (in the first update's order) and, per name, the updates stacked in float64."""
    if not updates:
        raise ValueError(f"{what} needs at least one update")
    names = list(updates[0].keys())
    for weights in updates[1:]:
        if list(weights.keys()) != names:
            raise ValueError("updates disagree on parameter names")
    stacks = {}
    for name in names:
        arrays = [np.asarray(w[name]) for w in updates]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise ValueError(f"updates disagree on the shape of {name!r}")
        stacks[name] = np.stack([a.astype(np.float64) for a in arrays])
    return names, stacks


def _like(value: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """A float64 result back in the reference tensor's dtype (integers rounded)."""
    if np.issubdtype(ref.dtype, np.integer):
        return np.rint(value).astype(ref.dtype)
    return value.astype(ref.dtype)


def coordinate_median(updates: Sequence[dict[str, np.ndarray]]) -> OrderedDict:
    """Per-coordinate median of the updates, unweighted (Yin et al. 2018).

    Computed in float64 and cast back to each tensor's dtype (integer tensors rounded). The
    median depends only on the multiset of values, so the order of the updates does not matter.
    """
    names, stacks = _stacked(updates, "coordinate_median")
    out: OrderedDict = OrderedDict()
    for name in names:
        out[name] = _like(np.median(stacks[name], axis=0), np.asarray(updates[0][name]))
    return out


def trimmed_mean(updates: Sequence[dict[str, np.ndarray]], beta: float) -> OrderedDict:
    """Per-coordinate mean after cutting int(beta * n) values from each end, unweighted.

    The semantics of scipy.stats.trim_mean(stack, beta, axis=0). Values are sorted per coordinate
    before summing, so the result does not depend on the order of the updates.
    """
    if not 0.0 <= beta:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    n = len(updates)
    cut = int(beta * n)
    if n and n - 2 * cut <= 0:
        raise ValueError(f"trimmed_mean: beta={beta} trims {cut} of {n} updates from each end, "
                         "leaving nothing to average")
    names, stacks = _stacked(updates, "trimmed_mean")
    out: OrderedDict = OrderedDict()
    for name in names:
        kept = np.sort(stacks[name], axis=0)[cut:n - cut]
        out[name] = _like(kept.mean(axis=0), np.asarray(updates[0][name]))
    return out
