"""Epsilon over several runs on the same data: one accountant composes every run's ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedray.privacy import epsilon_for
from fedray.privacy.totals import total_epsilon

DELTA = 1e-4


def fake_run(folder: Path, hospitals: dict[str, tuple[float, float, int]]) -> Path:
    """A run folder as a DP run leaves it: ledgers per hospital, metrics.json's privacy."""
    privacy = {"unit": "image", "hospitals": {}}
    for name, (sigma, q, steps) in hospitals.items():
        (folder / "hospitals" / name).mkdir(parents=True)
        (folder / "hospitals" / name / "ledger.json").write_text(json.dumps(
            {"mechanism": "rdp", "history": [[sigma, q, steps]], "steps": steps}))
        privacy["hospitals"][name] = {"epsilon": epsilon_for(sigma, q, steps, DELTA),
                                      "delta": DELTA, "unit": "image"}
    (folder / "metrics.json").write_text(json.dumps({"privacy": privacy}))
    return folder


def test_total_composes_every_run_of_a_hospital(tmp_path) -> None:
    a = fake_run(tmp_path / "a", {"hospital_a": (1.0, 0.1, 40), "hospital_b": (1.2, 0.2, 30)})
    b = fake_run(tmp_path / "b", {"hospital_a": (0.8, 0.1, 20)})
    total = total_epsilon([a, b])
    h_a = total["hospitals"]["hospital_a"]
    # the same accountant over both histories: RDP composes additively
    from opacus.accountants import RDPAccountant

    oracle = RDPAccountant()
    oracle.history = [(1.0, 0.1, 40), (0.8, 0.1, 20)]
    assert h_a["epsilon_total"] == pytest.approx(oracle.get_epsilon(DELTA))
    assert h_a["epsilon_total"] > max(h_a["per_run"].values())
    assert h_a["runs"] == 2 and total["hospitals"]["hospital_b"]["runs"] == 1
    assert total["hospitals"]["hospital_b"]["epsilon_total"] == pytest.approx(
        epsilon_for(1.2, 0.2, 30, DELTA))
    assert total["any_record"]["epsilon_total"] >= h_a["epsilon_total"]


def test_runs_without_dp_have_no_total(tmp_path) -> None:
    (tmp_path / "plain").mkdir()
    assert total_epsilon([tmp_path / "plain"]) is None
