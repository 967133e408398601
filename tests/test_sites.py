"""Site-local data: each hospital reads and splits only its own folder, evaluates there and
sends counts; the coordinator pools metrics exactly and names the worst site."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedray.config import ConfigError, load_config
from fedray.federation.coordinator import (Coordinator, EarlyStop, LocalPool,
                                           cross_site_duplicates)
from fedray.federation.client import HospitalClient
from fedray.data import sites, synth
from fedray.data.pipeline import DataPrepError

from conftest import tiny_config


@pytest.fixture(scope="module")
def site_folders(tmp_path_factory) -> dict[str, Path]:
    """Three site folders in the raw layout (Class/patient/x.png), as a hospital keeps them."""
    out = tmp_path_factory.mktemp("sites")
    config = tiny_config(out)
    table = synth.generate(n=270, size=32, seed=3, patients_per_class=9)
    return sites.split_sites(table, config.data, 3, 0, out / "sites", layout="folder")


def site_config(tmp_path: Path, folders: dict[str, Path], **overrides):
    return tiny_config(tmp_path, **{
        "data.source": "sites", "federation.hospitals": len(folders),
        "data.sites": json.dumps({n: {"path": str(f), "state_dir": str(tmp_path / "state" / n)}
                                  for n, f in folders.items()}), **overrides})


def test_split_sites_keeps_each_patient_at_one_site(site_folders) -> None:
    config = load_config(None)
    patients = {}
    for name, folder in site_folders.items():
        assert not (folder / "manifest.parquet").exists()  # a raw folder, catalogued at the site
        table = sites.read_site(folder, config.data)
        groups = set(table.column("group").to_pylist())
        assert all("/" in g for g in groups)  # Class/patient from the subfolders
        patients[name] = groups
    names = list(patients)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not patients[a] & patients[b], (a, b)


def test_local_split_is_group_aware_and_names_the_site(site_folders, tmp_path) -> None:
    config = load_config(None)
    folder = site_folders["hospital_a"]
    local = sites.split_site(sites.read_site(folder, config.data), config.data, 0, "hospital_a")
    by_split = {k: set(t.column("group").to_pylist()) for k, t in local.parts.items()}
    assert not by_split["train"] & by_split["test"] and not by_split["train"] & by_split["val"]
    one_patient = sites.read_site(folder, config.data).slice(0, 3)
    with pytest.raises(DataPrepError, match="hospital_z"):
        sites.split_site(one_patient, config.data, 0, "hospital_z")
    with pytest.raises(DataPrepError, match="does not exist"):
        sites.read_site(tmp_path / "nowhere", config.data)


def test_split_seed_fixes_the_split_whatever_the_run_seed() -> None:
    table = synth.generate_sites(n=240, size=16, seed=0, sites=1, patients_per_class=8)

    def test_patients(data, seed: int) -> dict[str, set[str]]:
        parts = sites.split_site(table, data, seed, "a").parts
        return {k: set(t.column("group").to_pylist()) for k, t in parts.items()}

    free = load_config(None).data
    drawn = [test_patients(free, seed) for seed in range(8)]
    assert any(d != drawn[0] for d in drawn)  # the run seed draws the split
    fixed = load_config(None, ["data.split.seed=0"]).data
    assert all(test_patients(fixed, seed) == drawn[0] for seed in range(8))


def test_sites_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="data.sites is required"):
        load_config(None, ["data.source=sites"])
    with pytest.raises(ConfigError, match="names 1"):
        load_config(None, ["data.source=sites", "federation.hospitals=2",
                           "data.sites={a: {path: /x}}"])


def test_site_run_pools_metrics_and_names_the_worst_site(site_folders, tmp_path) -> None:
    config = site_config(tmp_path, site_folders, **{"federation.rounds": 2,
                                                    "data.cross_site_duplicates": True})
    clients = [HospitalClient(name, None, config, tmp_path / "state" / name, num_threads=1)
               for name in sorted(site_folders)]
    opened: list[str] = []
    roots = [str(f.resolve()) for f in site_folders.values()]
    recording = [True]

    def hook(event, args):  # the coordinator must open nothing under any site folder
        if recording[0] and event in ("open", "os.listdir", "os.scandir") and args \
                and isinstance(args[0], (str, bytes)):
            path = str(Path(args[0] if isinstance(args[0], str) else args[0].decode()).resolve())
            if any(path.startswith(r) for r in roots):
                opened.append(path)

    sys.addaudithook(hook)
    try:
        coord = Coordinator(config, tmp_path, LocalPool(clients), None, num_threads=1)
        while coord.run_round() is not None:
            pass
        final = coord.finish()
    finally:
        recording[0] = False
    assert opened == []
    assert set(final["sites"]) == set(site_folders)
    for name, client in zip(sorted(site_folders), clients):
        assert final["sites"][name]["test"]["n"] == len(client.eval_data["test"])
    assert final["test"]["n"] == sum(len(c.eval_data["test"]) for c in clients)
    worst = min(final["sites"], key=lambda h: final["sites"][h]["test"]["balanced_accuracy"])
    assert final["worst_site"] == {"hospital": worst, "balanced_accuracy":
                                   final["sites"][worst]["test"]["balanced_accuracy"]}
    assert final["cross_site_duplicates"]["checked"] and final["cross_site_duplicates"]["duplicates"] == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["val_sites"]) == set(site_folders)
    assert (tmp_path / "state" / "hospital_a" / "state_0002.safetensors").is_file()
    assert not (tmp_path / "hospitals").exists()  # hospital state stays at the site


def test_cross_site_duplicates_count_shared_hashes() -> None:
    found = cross_site_duplicates({"a": ["x", "y", "z"], "b": ["y", "q"], "c": ["y", "z"]})
    assert found["duplicates"] == 2
    assert found["pairs"] == {"a|b": 1, "a|c": 2, "b|c": 1}


class CountingPool(LocalPool):
    """A LocalPool that records each evaluation's split; `drop` names a hospital whose answer
    to the evaluations after `drop_from` calls is lost (it could not answer)."""

    def __init__(self, clients, drop: str | None = None, drop_from: int = 0) -> None:
        super().__init__(clients)
        self.evaluated: list[str] = []
        self.drop, self.drop_from = drop, drop_from

    def evaluate(self, weights, split):
        self.evaluated.append(split)
        out = super().evaluate(weights, split)
        if self.drop and len(self.evaluated) > self.drop_from:
            out.pop(self.drop)
        return out


def site_coordinator(tmp_path: Path, folders: dict[str, Path], pool=CountingPool, rounds: int = 2,
                     **pool_args) -> Coordinator:
    config = site_config(tmp_path, folders, **{"federation.rounds": rounds})
    clients = [HospitalClient(name, None, config, tmp_path / "state" / name, num_threads=1)
               for name in sorted(folders)]
    return Coordinator(config, tmp_path, pool(clients, **pool_args), None, num_threads=1)


@pytest.mark.parametrize("last_is_best", [True, False])
def test_final_validation_is_the_best_models_and_reused_only_from_the_last_round(
        site_folders, tmp_path, last_is_best) -> None:
    coord = site_coordinator(tmp_path, site_folders)
    coord.run_round()
    # the last round's validation loss beats every earlier one (a fresh patience), or none
    coord.early = EarlyStop(None)
    if not last_is_best:
        coord.early.best = float("-inf")
    coord.run_round()
    assert (coord.best_round == 2) is last_is_best
    coord.pool.evaluated.clear()
    final = coord.finish()
    fresh = coord._evaluate("val", coord.best_weights)
    # the best model on every site, however it was obtained (metrics.json moves `sites` out)
    fresh_sites = fresh.pop("sites")
    assert final["val"] == fresh
    assert {h: m["val"] for h, m in final["sites"].items()} == fresh_sites
    assert coord.pool.evaluated.count("val") == (1 if last_is_best else 2)  # finish's own: 0 / 1
    assert final["val"]["n"] == sum(len(c.eval_data["val"]) for c in coord.pool.clients.values())


def test_final_validation_is_evaluated_again_when_a_site_missed_the_rounds(
        site_folders, tmp_path) -> None:
    # hospital_b's answer to the second round's validation is lost; at the end it answers
    coord = site_coordinator(tmp_path, site_folders, drop="hospital_b", drop_from=1)
    coord.run_round()
    coord.early = EarlyStop(None)
    coord.run_round()
    assert coord.best_round == 2 and "hospital_b" not in coord.history[-1]["val_sites"]
    coord.pool.drop = None
    coord.pool.evaluated.clear()
    final = coord.finish()
    assert "val" in coord.pool.evaluated  # evaluated again, now with every site
    assert "val" in final["sites"]["hospital_b"]


def test_ood_calibration_scores_the_first_messages_features(site_folders, tmp_path,
                                                            monkeypatch) -> None:
    from collections import OrderedDict

    from fedray.artifacts import ood
    from fedray.federation.messages import FitIns, to_numpy

    config = site_config(tmp_path, site_folders)
    client = HospitalClient("hospital_a", None, config, tmp_path / "state" / "a", num_threads=1)
    passes = []
    real = ood.unit_features
    monkeypatch.setattr(ood, "unit_features", lambda *a, **k: passes.append(1) or real(*a, **k))
    weights = to_numpy(client.model.state_dict())
    centroids, _ = ood.centroids_from_sums([client.ood_class_sums(weights)])
    copy = OrderedDict((k, v.copy()) for k, v in weights.items())  # equal values, new arrays
    first = client.ood_histogram(copy, centroids)
    assert len(passes) == 1 and sum(first) == len(client.eval_data["val"])
    assert client.ood_histogram(weights, centroids) == first and len(passes) == 2  # spent: again
    # other weights, or a round trained in between, are scored afresh
    client.ood_class_sums(weights)
    other = OrderedDict((k, v + 1.0 if v.dtype.kind == "f" else v) for k, v in weights.items())
    client.ood_histogram(other, centroids)
    assert len(passes) == 4
    client.ood_class_sums(weights)
    client.fit(weights, FitIns(round=1, lr=0.003, local_epochs=1, seed=0))
    client.ood_histogram(weights, centroids)
    assert len(passes) == 6
