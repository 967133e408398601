"""Hospitals that die, on a real local Ray: failures are data, restarts rejoin with their ledger."""

import threading
import time
from pathlib import Path

import pytest

from fedray import runtime
from fedray.coordinator import Coordinator
from fedray.data.pipeline import build_shards

from conftest import tiny_config

pytestmark = pytest.mark.ray

DP = {"model.dp_safe": "true", "privacy.enabled": "true", "federation.min_clients": 1,
      "runtime.max_restarts": 2, "training.local_epochs": 3}


@pytest.fixture()
def run(ray_session, tmp_path: Path, synth_table):
    config = tiny_config(tmp_path, **DP, **{"federation.rounds": 3})
    shards = build_shards(synth_table, config.data, 2, config.seed, tmp_path / "data")
    pool = runtime.RayPool(config, shards, tmp_path)
    pool.wait_ready()
    coord = Coordinator(config, tmp_path, pool, shards, num_threads=1)
    yield coord, pool
    for actor in pool.actors.values():
        ray_session.kill(actor)


def test_killed_hospital_is_a_failure_then_rejoins_with_its_ledger(ray_session, run) -> None:
    coord, pool = run
    first = coord.run_round()
    eps_b = first["hospitals"]["hospital_b"]["epsilon"]
    pid_b = pool.info["hospital_b"]["pid"]

    # killed between rounds: restarted by Ray, rejoins with its ledger
    ray_session.kill(pool.actors["hospital_b"], no_restart=False)
    second = coord.run_round()
    assert second["completed"] == ["hospital_a", "hospital_b"]
    assert second["hospitals"]["hospital_b"]["epsilon"] > eps_b * 1.2  # grew, did not reset
    assert ray_session.get(pool.actors["hospital_b"].info.remote())["pid"] != pid_b

    # killed mid-round: a 'died' failure, the round still counts with the other hospital
    killer = threading.Timer(1.0, lambda: ray_session.kill(pool.actors["hospital_b"], no_restart=False))
    killer.start()
    third = coord.run_round()
    killer.join()
    assert third["completed"] == ["hospital_a"] and third["counted"]
    assert [(f["hospital"], f["kind"]) for f in third["failures"]] == [("hospital_b", "died")]


def test_straggler_times_out_and_the_run_goes_on(ray_session, run) -> None:
    coord, pool = run
    coord.config = coord.config.model_copy(update={"federation": coord.config.federation.model_copy(
        update={"round_timeout_s": 0.5})})
    start = time.perf_counter()
    record = coord.run_round()
    assert time.perf_counter() - start < 20
    assert {f["kind"] for f in record["failures"]} == {"timeout"}
    assert not record["counted"] or record["completed"]


def test_budget_refusal_crosses_ray_as_a_budget_failure(ray_session, tmp_path: Path, synth_table) -> None:
    config = tiny_config(tmp_path, **DP, **{"privacy.budget": 1e-3, "federation.rounds": 2})
    shards = build_shards(synth_table, config.data, 2, config.seed, tmp_path / "data")
    pool = runtime.RayPool(config, shards, tmp_path)
    pool.wait_ready()
    try:
        coord = Coordinator(config, tmp_path, pool, shards, num_threads=1)
        record = coord.run_round()
        assert sorted((f["hospital"], f["kind"]) for f in record["failures"]) == [
            ("hospital_a", "budget"), ("hospital_b", "budget")]
        assert "privacy budget exhausted" in record["failures"][0]["message"]
        assert "privacy budget spent" in record["stop_reason"] and coord.run_round() is None
    finally:
        for actor in pool.actors.values():
            ray_session.kill(actor)
