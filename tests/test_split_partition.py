import numpy as np
import pyarrow as pa
import pytest

from fedray.data import partition
from fedray.data.split import assign_splits, check_disjoint, split_units


def manifest(n_patients: int = 40, per_patient: int = 10, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    classes = ["Benign", "Early", "Pre", "Pro"]
    rows = {"label": [], "group": [], "sha256": []}
    for p in range(n_patients):
        label = classes[p % 4]
        for i in range(per_patient):
            rows["label"].append(label)
            rows["group"].append(f"patient_{p}")
            rows["sha256"].append(f"{rng.integers(1 << 62):x}-{p}-{i}")
    return pa.table(rows)


def test_split_fractions_stratified_and_group_disjoint() -> None:
    table = manifest()
    splits = assign_splits(table, val=0.15, test=0.15, seed=0)
    frac = {s: float(np.mean(splits == s)) for s in ("train", "val", "test")}
    assert 0.6 <= frac["train"] <= 0.8 and 0.1 <= frac["test"] <= 0.2 and 0.1 <= frac["val"] <= 0.2
    labels = np.asarray(table.column("label").to_pylist())
    for s in ("train", "val", "test"):
        assert set(labels[splits == s]) == {"Benign", "Early", "Pre", "Pro"}
    assert check_disjoint(table, splits) == {"sha256": 0, "group": 0}


def test_split_is_deterministic_and_seed_dependent() -> None:
    table = manifest()
    a = assign_splits(table, val=0.15, test=0.15, seed=3)
    b = assign_splits(table, val=0.15, test=0.15, seed=3)
    c = assign_splits(table, val=0.15, test=0.15, seed=4)
    assert (a == b).all() and not (a == c).all()


def test_duplicates_stay_on_one_side_even_without_groups() -> None:
    table = manifest(n_patients=40, per_patient=5)
    hashes = table.column("sha256").to_pylist()
    groups = [""] * len(hashes)  # patient unknown: every image stands alone...
    for i in range(0, 60, 3):  # ...except byte-identical copies, across patients and classes
        hashes[i + 100] = hashes[i]
    t = pa.table({"label": table.column("label"), "group": groups, "sha256": hashes})
    for seed in range(5):
        splits = assign_splits(t, val=0.15, test=0.15, seed=seed)
        assert check_disjoint(t, splits)["sha256"] == 0


def test_split_units_join_groups_and_hashes() -> None:
    units = split_units(["a", "a", "b", "", "", "c"], ["h1", "h2", "h2", "h3", "h3", "h4"])
    assert units[0] == units[1] == units[2]  # a-h2-b chain
    assert units[3] == units[4] != units[0]  # same bytes, unknown group
    assert len(set(units)) == 3


def test_split_needs_enough_groups() -> None:
    with pytest.raises(ValueError, match="independent groups"):
        assign_splits(manifest(n_patients=4), val=0.15, test=0.15, seed=0)


def _labels_units(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(table.column("label").to_pylist())
    return labels, split_units(table.column("group").to_pylist(), table.column("sha256").to_pylist())


def test_iid_partition_balanced_and_patient_disjoint() -> None:
    labels, units = _labels_units(manifest(n_patients=80))
    owner = partition.iid(labels, units, 4, seed=0)
    sizes = np.bincount(owner, minlength=4)
    assert sizes.sum() == len(labels) and sizes.min() >= 0.8 * sizes.max()
    for h in range(4):
        assert len(set(labels[owner == h])) == 4
    for u in np.unique(units):
        assert len(set(owner[units == u])) == 1


def _skew(owner: np.ndarray, labels: np.ndarray) -> float:
    """Mean total-variation distance between each hospital's class mix and the global one."""
    classes = np.unique(labels)
    glob = np.array([np.mean(labels == c) for c in classes])
    tvs = []
    for h in np.unique(owner):
        mine = labels[owner == h]
        tvs.append(0.5 * np.abs(np.array([np.mean(mine == c) for c in classes]) - glob).sum())
    return float(np.mean(tvs))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels, units = _labels_units(manifest(n_patients=200, per_patient=3))
    skews = {}
    for alpha in (0.1, 100.0):
        owner = partition.dirichlet(labels, units, 4, alpha, seed=1, min_per_hospital=10)
        assert np.bincount(owner, minlength=4).min() >= 10
        skews[alpha] = _skew(owner, labels)
    assert skews[0.1] > 0.3 > 0.15 > skews[100.0]


def test_dirichlet_reports_impossible_minimum() -> None:
    labels, units = _labels_units(manifest(n_patients=8, per_patient=2))
    with pytest.raises(partition.PartitionError, match="min_per_hospital"):
        partition.dirichlet(labels, units, 4, 0.1, seed=0, min_per_hospital=10)


def test_by_group_partition() -> None:
    owner = partition.by_group(["s2", "s1", "s2", "s3"], 3)
    assert owner.tolist() == [1, 0, 1, 2]
    with pytest.raises(partition.PartitionError, match="found 3 sites"):
        partition.by_group(["s2", "s1", "s3"], 4)


def test_hospital_names() -> None:
    assert partition.hospital_names(3) == ["hospital_a", "hospital_b", "hospital_c"]
    assert len(set(partition.hospital_names(30))) == 30


def test_follow_mirrors_each_hospitals_class_mix() -> None:
    ref_labels = np.array(["A"] * 100 + ["B"] * 100)
    ref_owner = np.array([0] * 90 + [1] * 10 + [1] * 100)  # hospital 0: mostly A; 1: all B
    labels = np.array(["A"] * 200 + ["B"] * 200)
    owner = partition.follow(labels, np.arange(400), ref_labels, ref_owner, 2, seed=0)
    assert 0.8 < np.mean(owner[labels == "A"] == 0) < 0.97
    assert np.all(owner[labels == "B"] == 1)
    units = np.repeat(np.arange(40), 10)  # whole units move together
    owner = partition.follow(labels, units, ref_labels, ref_owner, 2, seed=1)
    assert all(len(set(owner[units == u])) == 1 for u in range(40))
