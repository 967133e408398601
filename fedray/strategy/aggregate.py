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
