"""A run stopped at each named point of a round, then resumed: nothing lost, epsilon never lower.

In-process (LocalPool): a fault raised in a hospital stops the whole process, as a machine crash
would; the resumed run builds fresh hospitals and a fresh coordinator from what is on disk.
Invariants after the resume: without DP the final weights equal an uninterrupted run's; with DP
every hospital's ledger counts at least the steps of every update it released (in both runs),
and its epsilon is at least the uninterrupted run's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedray.artifacts import checkpoint
from fedray.federation.faults import FaultInjected

from conftest import local_coordinator

ROUNDS = 2
DP = {"model.dp_safe": True, "privacy.enabled": True, "privacy.noise_multiplier": 1.0}
POINTS = [
    ("hospital_a", "before_fit"),
    ("hospital_a", "after_fit"),
    ("hospital_a", "after_state_saved"),
    ("hospital_b", "during_write"),
    ("coordinator", "before_checkpoint"),
    ("coordinator", "during_write"),
    ("coordinator", "after_checkpoint"),
]


def counting(coord, released: Counter):
    """Count every update that leaves a hospital (a FitRes returned to the coordinator)."""
    fit = coord.pool.fit

    def wrapped(weights, instructions, timeout_s):
        results, failures, timings = fit(weights, instructions, timeout_s)
        released.update(r.hospital for r in results)
        return results, failures, timings

    coord.pool.fit = wrapped
    return coord


def drive(coord) -> dict:
    while coord.run_round() is not None:
        pass
    return coord.finish()


def fault(process: str, point: str, round_number: int = 2) -> dict:
    return {"runtime.fault_injection": json.dumps(
        [{"process": process, "point": point, "round": round_number}])}


def crash_then_resume(run_dir: Path, shard_dir: Path, process: str, point: str,
                      settings: dict) -> tuple[object, dict, Counter]:
    released: Counter = Counter()
    crashing = counting(local_coordinator(run_dir, shard_dir, **settings,
                                          **fault(process, point)), released)
    with pytest.raises(FaultInjected, match=point):
        drive(crashing)
    resumed = counting(local_coordinator(run_dir, shard_dir, **settings), released)
    resumed.resume()
    final = drive(resumed)
    return resumed, final, released


@pytest.fixture(scope="module")
def clean(tmp_path_factory, shard_dir):
    """Uninterrupted runs, without and with DP, to compare against."""
    out = {}
    for mode, settings in (("plain", {}), ("dp", DP)):
        run_dir = tmp_path_factory.mktemp(f"clean-{mode}")
        coord = local_coordinator(run_dir, shard_dir, **{"federation.rounds": ROUNDS}, **settings)
        out[mode] = (coord, drive(coord))
    return out


@pytest.mark.parametrize("process,point", POINTS)
def test_plain_run_resumed_after_a_crash_ends_with_the_same_weights(
        tmp_path, shard_dir, clean, process, point) -> None:
    coord, final, _ = crash_then_resume(tmp_path, shard_dir, process, point,
                                        {"federation.rounds": ROUNDS})
    reference, reference_final = clean["plain"]
    assert final["rounds"] == ROUNDS
    for name, value in reference.weights.items():
        np.testing.assert_array_equal(coord.weights[name], value, err_msg=name)
    assert final["test"]["accuracy"] == reference_final["test"]["accuracy"]
    rounds = [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, ROUNDS + 1))  # one record per round, none doubled


@pytest.mark.parametrize("process,point", POINTS)
def test_dp_ledger_after_a_crash_counts_every_release(
        tmp_path, shard_dir, clean, process, point) -> None:
    coord, final, released = crash_then_resume(tmp_path, shard_dir, process, point,
                                               {"federation.rounds": ROUNDS, **DP})
    _, reference_final = clean["dp"]
    ours, theirs = final["privacy"]["hospitals"], reference_final["privacy"]["hospitals"]
    assert set(ours) == {"hospital_a", "hospital_b"}
    for name, ledger in ours.items():
        per_round = theirs[name]["dp_steps"] // ROUNDS
        assert ledger["dp_steps"] >= released[name] * per_round, name
        assert ledger["dp_steps"] >= theirs[name]["dp_steps"], name
        assert ledger["epsilon"] >= theirs[name]["epsilon"] - 1e-9, name
        on_disk = json.loads((tmp_path / "hospitals" / name / "ledger.json").read_text())
        assert on_disk["steps"] == ledger["dp_steps"]


def test_resume_from_an_older_checkpoint_never_rolls_the_ledger_back(tmp_path, shard_dir) -> None:
    """The crash window: round 2's update left the hospitals, its checkpoint did not land."""
    first = local_coordinator(tmp_path, shard_dir, **DP, **{"federation.rounds": 2})
    drive(first)
    steps_per_round = first.pool.ledgers()["hospital_a"]["dp_steps"] // 2
    checkpoint_2 = checkpoint.round_dir(tmp_path / "checkpoints", 2)
    assert checkpoint_2.is_dir()
    import shutil

    shutil.rmtree(checkpoint_2)
    resumed = local_coordinator(tmp_path, shard_dir, **DP, **{"federation.rounds": 3})
    assert resumed.resume() == 1
    final = drive(resumed)
    # released: round 1, round 2 (first run), round 2 again, round 3
    for name, ledger in final["privacy"]["hospitals"].items():
        assert ledger["dp_steps"] >= 4 * steps_per_round, name
        assert ledger["releases"] == 4


def test_resume_passes_over_torn_newest_files_and_names_them(tmp_path, shard_dir) -> None:
    drive(local_coordinator(tmp_path, shard_dir, **DP, **{"federation.rounds": 2}))
    torn_state = tmp_path / "hospitals" / "hospital_a" / "state_0002.safetensors"
    torn_round = checkpoint.round_dir(tmp_path / "checkpoints", 2) / "state.json"
    for path in (torn_state, torn_round):
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    resumed = local_coordinator(tmp_path, shard_dir, **DP, **{"federation.rounds": 3})
    assert resumed.resume() == 1
    final = drive(resumed)
    assert final["rounds"] == 3
    skipped = "\n".join(final["resume_skipped"])
    assert str(torn_state) in skipped and str(torn_round.parent) in skipped
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
