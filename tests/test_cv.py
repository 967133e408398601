"""k-fold cross-validation: fold splits by whole units, and a tiny federated + centralized CV."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedray.experiments.cv import METRICS, summarize, to_markdown
from fedray.data.pipeline import DataPrepError, build_shards
from fedray.data.split import assign_fold_splits, assign_folds, assign_splits, check_disjoint

from conftest import tiny_config

CLASSES = ["Benign", "Early", "Pre", "Pro"]


def manifest(n_patients: int = 40, per_patient: int = 6, seed: int = 0,
             dups: bool = True) -> pa.Table:
    """Patients of one class each; some byte-identical copies across patients and classes."""
    rng = np.random.default_rng(seed)
    rows = {"label": [], "group": [], "sha256": []}
    for p in range(n_patients):
        for i in range(per_patient):
            rows["label"].append(CLASSES[p % 4])
            rows["group"].append(f"patient_{p}")
            rows["sha256"].append(f"{rng.integers(1 << 62):x}-{p}-{i}")
    if dups:
        n = len(rows["sha256"])
        for i in range(0, 60, 4):  # copy a few images into other patients' rows
            rows["sha256"][n - 1 - i] = rows["sha256"][i]
    return pa.table(rows)


@pytest.mark.parametrize("folds", [2, 5])
def test_every_row_tested_exactly_once(folds: int) -> None:
    table = manifest()
    tested = np.zeros(table.num_rows, dtype=int)
    fold_of = assign_folds(table, folds=folds, seed=1)
    for k in range(folds):
        splits = assign_fold_splits(table, folds=folds, fold=k, val=0.15, seed=1)
        assert set(splits) == {"train", "val", "test"}
        assert ((splits == "test") == (fold_of == k)).all()
        tested += splits == "test"
        assert check_disjoint(table, splits) == {"sha256": 0, "group": 0}
    assert (tested == 1).all()


def test_folds_are_stratified_and_sized() -> None:
    table = manifest(n_patients=80, per_patient=5, dups=False)
    labels = np.asarray(table.column("label").to_pylist())
    overall = np.array([np.mean(labels == c) for c in CLASSES])
    for k in range(5):
        splits = assign_fold_splits(table, folds=5, fold=k, val=0.15, seed=0)
        test = labels[splits == "test"]
        assert 0.15 <= len(test) / len(labels) <= 0.25
        share = np.array([np.mean(test == c) for c in CLASSES])
        assert np.abs(share - overall).max() <= 0.1
        val_frac = np.mean(splits == "val")
        assert 0.1 <= val_frac <= 0.25
        assert set(labels[splits == "val"]) == set(CLASSES)


def test_units_never_span_splits_without_groups() -> None:
    """Unknown patients: only duplicates bind rows, and they still stay on one side."""
    table = manifest(dups=True)
    t = table.set_column(table.schema.get_field_index("group"), "group",
                         pa.array([""] * table.num_rows))
    for k in range(3):
        splits = assign_fold_splits(t, folds=3, fold=k, val=0.1, seed=k)
        assert check_disjoint(t, splits)["sha256"] == 0
    groups = table.column("group").to_pylist()
    fold_of = assign_folds(table, folds=4, seed=2)
    for g in set(groups):
        assert len({f for f, gg in zip(fold_of, groups) if gg == g}) == 1


def test_fold_splits_deterministic_and_seed_dependent() -> None:
    table = manifest()
    a = assign_fold_splits(table, folds=4, fold=1, val=0.15, seed=5)
    b = assign_fold_splits(table, folds=4, fold=1, val=0.15, seed=5)
    c = assign_fold_splits(table, folds=4, fold=1, val=0.15, seed=6)
    assert (a == b).all() and not (a == c).all()
    # assign_splits is untouched by the refactor
    assert (assign_splits(table, val=0.15, test=0.15, seed=3)
            == assign_splits(table, val=0.15, test=0.15, seed=3)).all()


def test_fold_split_errors() -> None:
    table = manifest(n_patients=4, per_patient=3, dups=False)
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(table, folds=1, seed=0)
    with pytest.raises(ValueError, match="only 4 independent groups"):
        assign_folds(table, folds=5, seed=0)
    with pytest.raises(ValueError, match="fold must be"):
        assign_fold_splits(table, folds=3, fold=3, val=0.1, seed=0)
    with pytest.raises(ValueError, match="no training data"):
        assign_fold_splits(table, folds=2, fold=0, val=0.5, seed=0)


def test_build_shards_from_given_splits(synth_table, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    splits = assign_fold_splits(synth_table, folds=3, fold=2, val=0.15, seed=0)
    shards = build_shards(synth_table, config.data, 2, 0, tmp_path / "s", splits=splits)
    assert sum(shards.counts["test"].values()) == int(np.sum(splits == "test"))
    test_paths = set(pq.read_table(shards.path(shards.test)).column("path").to_pylist())
    paths = np.asarray(synth_table.column("path").to_pylist())
    assert test_paths == set(paths[splits == "test"])
    with pytest.raises(DataPrepError, match="one of 'train'"):
        build_shards(synth_table, config.data, 2, 0, tmp_path / "x", splits=splits[:-1])
    with pytest.raises(DataPrepError, match="only 'train', 'val', 'test'"):
        build_shards(synth_table, config.data, 2, 0, tmp_path / "x",
                     splits=np.where(splits == "val", "holdout", splits))


def test_summary_is_numpy_mean_and_sample_std() -> None:
    rows = [{"fold": k, **{m: v for m in METRICS}} for k, v in enumerate([0.5, 0.7, 0.9])]
    rows[1]["roc_auc_macro"] = None
    mean, std, n = summarize(rows)
    assert mean["accuracy"] == pytest.approx(0.7) and std["accuracy"] == pytest.approx(0.2)
    assert n["roc_auc_macro"] == 2 and mean["roc_auc_macro"] == pytest.approx(0.7)
    md = to_markdown({"folds": 3, "seed": 0, "federated": {"per_fold": rows, "mean": mean,
                                                            "std": std}, "centralized": None})
    assert "| accuracy | 0.700 ± 0.200 | - | 0.500 | 0.700 | 0.900 |" in md
    assert "ddof=1" in md


def _fake_centralized(calls: list):
    """Stands in for the Ray Train baseline (~20-40 s per fold on 2 busy cores); test_compare
    and test_ray_train run the real one. Reports the shard set it was given."""

    def fake(config, shards, run_dir, workers=2):
        n = pq.read_table(shards.path(shards.test)).num_rows
        calls.append((Path(shards.root), Path(run_dir), workers))
        value = 0.25 * len(calls)
        return {"test": {**{m: value for m in METRICS}, "n": n}, "seconds": 0.0}

    return fake


@pytest.mark.ray
@pytest.mark.slow
def test_run_cv_two_folds(ray_session, tmp_path: Path, monkeypatch) -> None:
    import fedray.experiments.centralized
    from fedray.experiments.cv import run_cv
    from fedray.data.pipeline import load_source

    calls: list = []
    monkeypatch.setattr(fedray.experiments.centralized, "run_centralized", _fake_centralized(calls))
    config = tiny_config(tmp_path)
    logs: list[str] = []
    folder = run_cv(config, folds=2, centralized=True, output_dir=tmp_path / "cv",
                    workers=3, log=logs.append)
    result = json.loads((folder / "cv.json").read_text())
    assert result["folds"] == 2 and result["std_ddof"] == 1
    for arm in ("federated", "centralized"):
        per_fold = result[arm]["per_fold"]
        assert [f["fold"] for f in per_fold] == [0, 1]
        for key in METRICS:
            values = [f[key] for f in per_fold if f[key] is not None]
            assert result[arm]["mean"][key] == pytest.approx(float(np.mean(values)))
            if len(values) == 2:
                assert result[arm]["std"][key] == pytest.approx(float(np.std(values, ddof=1)))
        assert all(0 <= f["accuracy"] <= 1 for f in per_fold)
    assert result["centralized"]["mean"]["accuracy"] == pytest.approx(0.375)  # (0.25 + 0.5) / 2
    assert [(c[0].parent.name, c[1].relative_to(folder).as_posix(), c[2]) for c in calls] == [
        ("fold_0", "fold_0/runs/centralized", 3), ("fold_1", "fold_1/runs/centralized", 3)]
    # the folds' test sets partition the dataset, and both arms are tested on their fold's test set
    table = load_source(config.data, config.seed)
    tested: list[str] = []
    for k in range(2):
        data = folder / f"fold_{k}" / "data"
        shards = json.loads((data / "shards.json").read_text())
        tested += pq.read_table(data / shards["test"]).column("path").to_pylist()
        n_test = sum(shards["counts"]["test"].values())
        assert result["federated"]["per_fold"][k]["n_test"] == n_test
        assert result["centralized"]["per_fold"][k]["n_test"] == n_test
        assert json.loads((data / "fold.json").read_text())["test"] == n_test
        assert (folder / result["federated"]["per_fold"][k]["run_dir"] / "metrics.jsonl").is_file()
    assert sorted(tested) == sorted(table.column("path").to_pylist())
    md = (folder / "cv.md").read_text()
    assert "| accuracy |" in md and "fold 1 cen" in md and "ddof=1" in md
    assert "| accuracy | " in md and "| 0.375 ± 0.177 |" in md
