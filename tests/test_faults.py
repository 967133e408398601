"""Hospitals that die, on a real local Ray: failures are data, restarts rejoin with their ledger.

Every fault is injected at a named point (runtime.fault_injection): a hospital process exits
after saving its state in round 2, or before training in round 3, or hangs; no timer decides.
"""

import json
import time
from pathlib import Path

import pytest

from fedray.federation import runtime
from fedray.federation.coordinator import Coordinator
from fedray.data.pipeline import build_shards

from conftest import tiny_config

pytestmark = pytest.mark.ray

DP = {"model.dp_safe": "true", "privacy.enabled": "true", "federation.min_clients": 1,
      "runtime.max_restarts": 2, "training.local_epochs": 3}


FAULTS = [{"process": "hospital_b", "point": "after_state_saved", "round": 2, "action": "exit"},
          {"process": "hospital_b", "point": "before_fit", "round": 3, "action": "exit"}]


@pytest.fixture()
def run(ray_session, tmp_path: Path, synth_table):
    config = tiny_config(tmp_path, **DP, **{"federation.rounds": 3,
                                            "runtime.fault_injection": json.dumps(FAULTS)})
    shards = build_shards(synth_table, config.data, 2, config.seed, tmp_path / "data")
    pool = runtime.RayPool(config, shards, tmp_path)
    pool.wait_ready()
    coord = Coordinator(config, tmp_path, pool, shards, num_threads=1)
    yield coord, pool
    pool.kill()


def test_killed_hospital_is_a_failure_then_rejoins_with_its_ledger(ray_session, run) -> None:
    coord, pool = run
    first = coord.run_round()
    steps_b = pool.ledgers()["hospital_b"]["dp_steps"]
    pid_b = pool.info["hospital_b"]["pid"]

    # dies after its state and ledger are saved, before its update leaves: a 'died' failure,
    # and the round still counts with the other hospital
    second = coord.run_round()
    assert second["completed"] == ["hospital_a"] and second["counted"]
    assert [(f["hospital"], f["kind"]) for f in second["failures"]] == [("hospital_b", "died")]

    # restarted by Ray with its ledger, which counted round 2's training: it never resets
    ledger_b = pool.ledgers()["hospital_b"]
    assert ray_session.get(pool.actors["hospital_b"].info.remote())["pid"] != pid_b
    assert ledger_b["dp_steps"] == 2 * steps_b and ledger_b["epsilon"] > 0

    # dies before training in round 3: nothing released, nothing more counted
    third = coord.run_round()
    assert third["completed"] == ["hospital_a"] and third["counted"]
    assert [(f["hospital"], f["kind"]) for f in third["failures"]] == [("hospital_b", "died")]
    assert pool.ledgers()["hospital_b"]["dp_steps"] == 2 * steps_b
    assert first["hospitals"]["hospital_b"]["dp_steps"] == steps_b


def test_straggler_times_out_and_the_run_goes_on(ray_session, tmp_path: Path, synth_table) -> None:
    """hospital_b never returns from round 1 (it hangs at a named point): a timeout failure,
    and the round counts with hospital_a."""
    hang = [{"process": "hospital_b", "point": "before_fit", "round": 1, "action": "hang"}]
    config = tiny_config(tmp_path, **{"federation.round_timeout_s": 5,
                                      "runtime.fault_injection": json.dumps(hang)})
    shards = build_shards(synth_table, config.data, 2, config.seed, tmp_path / "data")
    pool = runtime.RayPool(config, shards, tmp_path)
    pool.wait_ready()
    try:
        coord = Coordinator(config, tmp_path, pool, shards, num_threads=1)
        start = time.perf_counter()
        record = coord.run_round()
        assert time.perf_counter() - start < 60
        assert [(f["hospital"], f["kind"]) for f in record["failures"]] == [("hospital_b", "timeout")]
        assert record["completed"] == ["hospital_a"] and record["counted"]
    finally:
        pool.kill()


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
        pool.kill()
