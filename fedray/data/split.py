"""Train/val/test splits made before any augmentation, stratified and group-aware.

Rows that share a patient (the `group` column) or share bytes (the `sha256` column) form one
split unit, so no patient and no duplicated image ever sits on two sides of a split. This is
the leakage both source papers suffered from: they augmented first and split after.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
from sklearn.model_selection import StratifiedGroupKFold

SPLITS = ("train", "val", "test")


def split_units(groups: list[str] | None, hashes: list[str]) -> np.ndarray:
    """Unit id per row: rows connected by a shared group or a shared sha256 get the same id.

    An empty group means "patient unknown" and joins nothing.
    """
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(keys: list[str]) -> None:
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key == "":  # unknown group: the row stands alone
                continue
            if key in first:
                a, b = find(i), find(first[key])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[key] = i

    join(hashes)
    if groups is not None:
        join(groups)
    roots = [find(i) for i in range(n)]
    _, ids = np.unique(np.asarray(roots), return_inverse=True)
    return ids


def _take_fold(labels: np.ndarray, units: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about `fraction` of rows, chosen by whole units, stratified by label."""
    n_splits = max(2, int(round(1.0 / fraction)))
    n_units = len(np.unique(units))
    if n_units < n_splits:
        raise ValueError(
            f"cannot hold out {fraction:.0%}: only {n_units} independent groups "
            f"(patients/duplicates) for {n_splits} folds; lower the fraction or add data"
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(sgkf.split(np.zeros(len(labels)), labels, units))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def _labels_and_units(table: pa.Table, group_aware: bool) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(table.column("label").to_pylist())
    hashes = table.column("sha256").to_pylist()
    groups = None
    if group_aware and "group" in table.column_names:
        groups = [str(g) for g in table.column("group").to_pylist()]
    return labels, split_units(groups, hashes)


def _with_val(labels: np.ndarray, units: np.ndarray, test_mask: np.ndarray, val: float,
              test: float, seed: int) -> np.ndarray:
    """'test' where `test_mask`, then about `val` of all rows carved from the rest as 'val'."""
    out = np.full(len(labels), "train", dtype=object)
    out[test_mask] = "test"
    if val > 0:
        rest = np.flatnonzero(~test_mask)
        rel = val / (1.0 - test)
        val_mask = _take_fold(labels[rest], units[rest], rel, seed + 1)
        out[rest[val_mask]] = "val"
    return out


def assign_splits(
    table: pa.Table, *, val: float, test: float, seed: int, group_aware: bool = True
) -> np.ndarray:
    """An array of 'train' / 'val' / 'test', one per row of a manifest table."""
    labels, units = _labels_and_units(table, group_aware)
    test_mask = _take_fold(labels, units, test, seed)
    return _with_val(labels, units, test_mask, val, test, seed)


def assign_folds(table: pa.Table, *, folds: int, seed: int, group_aware: bool = True) -> np.ndarray:
    """The cross-validation fold (0..folds-1) of every row: whole split units, stratified.

    Uses the same units as `assign_splits` (patient group joined with duplicate sha256), so a
    patient or a duplicated image lies in exactly one fold. Deterministic for a given seed.
    """
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    labels, units = _labels_and_units(table, group_aware)
    n_units = len(np.unique(units))
    if n_units < folds:
        raise ValueError(
            f"cannot make {folds} folds: only {n_units} independent groups "
            f"(patients/duplicates); use fewer folds or add data"
        )
    sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    with warnings.catch_warnings():  # "least populated class has only k members": fine here
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, held) in enumerate(sgkf.split(np.zeros(len(labels)), labels, units)):
            fold_of[held] = k
    empty = sorted(set(range(folds)) - set(fold_of.tolist()))
    if empty:
        raise ValueError(f"folds {empty} came out empty: {n_units} groups are too few "
                         f"for {folds} folds")
    return fold_of


def assign_fold_splits(
    table: pa.Table, *, folds: int, fold: int, val: float, seed: int, group_aware: bool = True
) -> np.ndarray:
    """'train' / 'val' / 'test' per row for one cross-validation fold.

    The test rows are fold `fold` of `assign_folds(table, folds=folds, seed=seed)`, so over
    fold = 0..folds-1 every row is tested exactly once. `val` is a fraction of all rows, carved
    from the remaining rows by whole units, as `assign_splits` does.
    """
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    test = 1.0 / folds
    if val < 0 or val >= 1.0 - test:
        raise ValueError(f"val={val} leaves no training data with {folds} folds "
                         f"(test takes {test:.0%}); lower data.split.val")
    labels, units = _labels_and_units(table, group_aware)
    test_mask = assign_folds(table, folds=folds, seed=seed, group_aware=group_aware) == fold
    return _with_val(labels, units, test_mask, val, test, seed)


def check_disjoint(table: pa.Table, splits: np.ndarray) -> dict[str, int]:
    """Counts of sha256 and group values found in more than one split (all must be zero)."""
    report = {}
    for column in ("sha256", "group"):
        if column not in table.column_names:
            continue
        values = np.asarray([str(v) for v in table.column(column).to_pylist()])
        seen: dict[str, set[str]] = {}
        for value, split in zip(values, splits):
            seen.setdefault(value, set()).add(split)
        report[column] = sum(1 for s in seen.values() if len(s) > 1)
    return report
