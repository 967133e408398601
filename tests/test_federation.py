"""The round loop in-process (LocalPool): determinism, resume, FedAvg invariants. No Ray."""

from pathlib import Path

import numpy as np
import torch
import pytest

from fedray.federation.coordinator import Coordinator
from fedray.data.shards import ShardSet

from conftest import local_coordinator


make_coordinator = local_coordinator


def run_all(coord: Coordinator) -> list[dict]:
    records = []
    while (rec := coord.run_round()) is not None:
        records.append(rec)
    return records


def test_shards_hold_disjoint_rows(shard_dir: Path) -> None:
    import pyarrow.parquet as pq

    shards = ShardSet.load(shard_dir)
    seen: dict[str, str] = {}
    for name in [*shards.hospitals.values(), shards.val, shards.test]:
        for digest in pq.read_table(shards.path(name), columns=["sha256"]).column(0).to_pylist():
            assert digest not in seen, f"{digest} in {name} and {seen[digest]}"
            seen[digest] = name
    assert set(shards.counts) == {"hospital_a", "hospital_b", "val", "test"}


def test_same_seed_same_metrics_and_weights(tmp_path: Path, shard_dir: Path) -> None:
    a = make_coordinator(tmp_path / "a", shard_dir, **{"federation.rounds": 2})
    b = make_coordinator(tmp_path / "b", shard_dir, **{"federation.rounds": 2})
    ra, rb = run_all(a), run_all(b)
    assert [r["val"] for r in ra] == [r["val"] for r in rb]
    assert [r["hospitals"]["hospital_a"]["loss"] for r in ra] == \
           [r["hospitals"]["hospital_a"]["loss"] for r in rb]
    for name in a.weights:
        assert np.array_equal(a.weights[name], b.weights[name]), name
    assert ra[-1]["round"] == 2 and ra[0]["counted"]


def test_resume_gives_the_uninterrupted_weights(tmp_path: Path, shard_dir: Path) -> None:
    full = make_coordinator(tmp_path / "full", shard_dir, **{"federation.rounds": 3})
    run_all(full)

    stopped = make_coordinator(tmp_path / "part", shard_dir, **{"federation.rounds": 3})
    stopped.run_round()
    stopped.run_round()
    del stopped  # the process "dies": only the run folder survives

    resumed = make_coordinator(tmp_path / "part", shard_dir, **{"federation.rounds": 3})
    assert resumed.resume() == 2
    assert resumed.run_round()["round"] == 3 and resumed.run_round() is None
    for name in full.weights:
        assert np.array_equal(full.weights[name], resumed.weights[name]), name
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    final_full, final_resumed = full.finish(), resumed.finish()
    assert final_full["test"]["accuracy"] == final_resumed["test"]["accuracy"]


def test_one_round_of_fedavg_equals_weighted_mean_of_hospitals(tmp_path: Path, shard_dir: Path) -> None:
    coord = make_coordinator(tmp_path / "r", shard_dir)
    sent = {k: v.copy() for k, v in coord.weights.items()}
    captured = []
    original = coord.pool.fit

    def spy(weights, instructions, timeout_s):
        results, failures, timings = original(weights, instructions, timeout_s)
        captured.extend(results)
        return results, failures, timings

    coord.pool.fit = spy
    coord.run_round()
    total = sum(r.num_samples for r in captured)
    name = next(k for k in coord.weights if k.endswith("weight"))
    expected = sum(r.weights[name].astype(np.float64) * r.num_samples / total for r in captured)
    np.testing.assert_allclose(coord.weights[name], expected, rtol=1e-5, atol=1e-7)
    assert not np.array_equal(coord.weights[name], sent[name])


def test_failed_hospital_is_data_not_a_crash(tmp_path: Path, shard_dir: Path) -> None:
    coord = make_coordinator(tmp_path / "f", shard_dir, **{"federation.min_clients": 2})
    broken = coord.pool.clients["hospital_b"]
    broken.fit = lambda weights, ins: (_ for _ in ()).throw(MemoryError("simulated OOM"))
    before = {k: v.copy() for k, v in coord.weights.items()}
    record = coord.run_round()
    assert record["completed"] == ["hospital_a"] and not record["counted"]
    assert record["failures"][0]["hospital"] == "hospital_b"
    assert "simulated OOM" in record["failures"][0]["message"]
    assert all(np.array_equal(before[k], coord.weights[k]) for k in before)


def test_early_stopping_and_plateau_follow_val_loss(tmp_path: Path, shard_dir: Path) -> None:
    coord = make_coordinator(tmp_path / "e", shard_dir, **{
        "federation.rounds": 10, "training.early_stopping_patience": 3,
        "training.plateau.patience": 1, "training.plateau.factor": 0.5,
        "training.plateau.min_lr": 0, "training.lr": 0.01})
    for r, loss in enumerate([1.0, 0.8, 0.9, 0.9], start=1):
        coord.round = r
        coord._after_round({"loss": loss})
    assert coord.best_round == 2 and coord.stop_reason is None
    assert coord.lr == pytest.approx(0.005)  # two rounds without improvement, patience 1
    coord.round = 5
    coord._after_round({"loss": 0.95})
    assert "early stopping" in coord.stop_reason and coord.finished
    assert coord.run_round() is None


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "fedyogi", "fedbn", "fedmedian",
                                  "fedtrimmedavg"])
def test_every_strategy_runs_the_round_loop(tmp_path: Path, shard_dir: Path, name: str) -> None:
    coord = make_coordinator(tmp_path / name, shard_dir, **{"federation.strategy.name": name,
                                                            "federation.rounds": 2})
    records = run_all(coord)
    assert [r["counted"] for r in records] == [True, True]
    assert np.isfinite(records[-1]["val"]["loss"])


def test_fedbn_hospitals_keep_their_own_norm_layers(tmp_path: Path, shard_dir: Path) -> None:
    coord = make_coordinator(tmp_path / "bn", shard_dir, **{"federation.strategy.name": "fedbn",
                                                            "federation.rounds": 2})
    run_all(coord)
    a, b = (coord.pool.clients[n].model.state_dict() for n in ("hospital_a", "hospital_b"))
    key = "features.0.1.running_mean"
    assert key in coord.strategy.norm_keys and not torch.equal(a[key], b[key])
    conv = "features.0.0.weight"  # shared layers came from the same global model this round
    assert not torch.equal(a[conv], b[conv])  # ...then each trained locally


def test_fedprox_keeps_hospitals_closer_to_the_global_model(tmp_path: Path, shard_dir: Path) -> None:
    drift = {}
    for mu in (0.0, 10.0):
        coord = make_coordinator(tmp_path / f"mu{mu}", shard_dir, **{
            "federation.strategy.name": "fedprox", "federation.strategy.mu": mu,
            "training.local_epochs": 2})
        start = {k: v.copy() for k, v in coord.weights.items()}
        captured = []
        original = coord.pool.fit
        coord.pool.fit = lambda w, i, t: (lambda r: (captured.extend(r[0]), r)[1])(original(w, i, t))
        coord.run_round()
        drift[mu] = np.mean([np.sqrt(sum(((r.weights[k] - start[k]) ** 2).sum()
                                         for k in start if k.endswith("weight")))
                             for r in captured])
    assert drift[10.0] < 0.9 * drift[0.0]


def test_fedadam_server_state_survives_resume(tmp_path: Path, shard_dir: Path) -> None:
    settings = {"federation.strategy.name": "fedadam", "federation.rounds": 3}
    full = make_coordinator(tmp_path / "full", shard_dir, **settings)
    run_all(full)
    part = make_coordinator(tmp_path / "part", shard_dir, **settings)
    part.run_round(), part.run_round()
    resumed = make_coordinator(tmp_path / "part", shard_dir, **settings)
    resumed.resume()
    resumed.run_round()
    for name in full.weights:
        assert np.array_equal(full.weights[name], resumed.weights[name]), name


def test_client_level_dp_records_a_growing_server_epsilon(tmp_path: Path, shard_dir: Path) -> None:
    coord = make_coordinator(tmp_path / "cdp", shard_dir, **{
        "federation.strategy.name": "dpfedavg", "federation.strategy.clip_norm": 1.0,
        "federation.strategy.noise_multiplier": 0.05, "federation.rounds": 2,
        "model.dp_safe": "true"})
    first, second = coord.run_round(), coord.run_round()
    assert coord.strategy.total_hospitals == 2
    assert 0 < first["server_dp"]["epsilon"] < second["server_dp"]["epsilon"]
    assert first["server_dp"]["aggregated"] == 2
