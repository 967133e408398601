"""Divide the training split among hospitals: iid, Dirichlet label skew, or a real site column.

Partitions move whole units (a patient and its duplicates), as a real patient is seen at one
hospital only. Each scheme is a pure function of (labels, units, seed).
"""

from __future__ import annotations

import numpy as np


class PartitionError(ValueError):
    """A partition that cannot satisfy the configured constraints."""


def hospital_names(count: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    if count <= len(letters):
        return [f"hospital_{letters[i]}" for i in range(count)]
    return [f"hospital_{i:03d}" for i in range(count)]


def iid(labels: np.ndarray, units: np.ndarray, hospitals: int, seed: int) -> np.ndarray:
    """Stratified, equal-sized shards: each hospital sees every class in the same proportion."""
    if len(np.unique(units)) < hospitals:
        raise PartitionError(f"only {len(np.unique(units))} groups for {hospitals} hospitals")
    owner = np.empty(len(labels), dtype=np.int64)
    from sklearn.model_selection import StratifiedGroupKFold  # imported here: naming hospitals needs none of it

    sgkf = StratifiedGroupKFold(n_splits=hospitals, shuffle=True, random_state=seed)
    for h, (_, idx) in enumerate(sgkf.split(np.zeros(len(labels)), labels, units)):
        owner[idx] = h
    return owner


def dirichlet(
    labels: np.ndarray,
    units: np.ndarray,
    hospitals: int,
    alpha: float,
    seed: int,
    min_per_hospital: int,
    attempts: int = 200,
) -> np.ndarray:
    """Label skew: each class's units are spread over hospitals by proportions ~ Dir(alpha)."""
    rng = np.random.default_rng(seed)
    unit_ids = np.unique(units)
    unit_label = {u: labels[np.flatnonzero(units == u)[0]] for u in unit_ids}
    for _ in range(attempts):
        owner_of_unit: dict[int, int] = {}
        for cls in np.unique(labels):
            members = np.array([u for u in unit_ids if unit_label[u] == cls])
            rng.shuffle(members)
            share = rng.dirichlet(np.full(hospitals, alpha))
            cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
            for h, chunk in enumerate(np.split(members, cuts)):
                owner_of_unit.update({int(u): h for u in chunk})
        owner = np.array([owner_of_unit[int(u)] for u in units])
        if np.bincount(owner, minlength=hospitals).min() >= min_per_hospital:
            return owner
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) draw gave every one of {hospitals} hospitals "
        f"{min_per_hospital}+ images in {attempts} attempts; raise alpha or lower "
        "data.partition.min_per_hospital"
    )


def by_group(sites: list[str], hospitals: int) -> np.ndarray:
    """One hospital per distinct site value, in sorted order."""
    names = sorted(set(sites))
    if len(names) != hospitals:
        raise PartitionError(
            f"by-group partition found {len(names)} sites {names[:8]} but "
            f"federation.hospitals is {hospitals}"
        )
    index = {s: i for i, s in enumerate(names)}
    return np.array([index[s] for s in sites])



def follow(
    labels: np.ndarray,
    units: np.ndarray,
    ref_labels: np.ndarray,
    ref_owner: np.ndarray,
    hospitals: int,
    seed: int,
) -> np.ndarray:
    """Give each unit to a hospital with that hospital's share of its class in a reference
    partition, so a hospital's local validation rows mirror its training mix (label skew too)."""
    rng = np.random.default_rng(seed)
    owner = np.empty(len(labels), dtype=np.int64)
    for u in np.unique(units):
        rows = np.flatnonzero(units == u)
        counts = np.bincount(ref_owner[ref_labels == labels[rows[0]]], minlength=hospitals)
        share = counts / counts.sum() if counts.sum() else np.full(hospitals, 1 / hospitals)
        owner[rows] = rng.choice(hospitals, p=share)
    return owner
