"""Strategies and a Ray Train centralized baseline on the same shards, with one table."""

import json
from pathlib import Path

import pytest

from fedray.cli import main as cli_main
from fedray.compare import variants

from conftest import tiny_config

pytestmark = pytest.mark.ray


def test_variants_differ_only_where_asked(tmp_path: Path) -> None:
    base = tiny_config(tmp_path)
    out = variants(base, ["fedavg", "fedprox"], dp=True)
    assert list(out) == ["fedavg", "fedprox", "fedavg+dp"]
    assert out["fedprox"].federation.strategy.name == "fedprox"
    assert out["fedavg+dp"].privacy.enabled and out["fedavg+dp"].model.dp_safe
    assert out["fedprox"].data == base.data and out["fedprox"].training == base.training


def test_compare_with_centralized_baseline(ray_session, tmp_path: Path, capsys) -> None:
    sets = ["name=tiny", "data.synth.n=240", "data.synth.size=32", "data.synth.patients_per_class=6",
             "data.image_size=32", "data.partition.min_per_hospital=10", "federation.hospitals=2",
             "federation.rounds=1", "federation.min_clients=1", "runtime.hospital_num_cpus=1"]
    args = ["compare", "--strategies", "fedavg", "fedbn", "--centralized",
            "--output-dir", str(tmp_path / "cmp")]
    for s in sets:
        args += ["--set", s]
    assert cli_main(args) == 0
    folder = next((tmp_path / "cmp").iterdir())
    comparison = json.loads((folder / "comparison.json").read_text())
    rows = comparison["variants"]
    assert comparison["privacy_total"] is None  # no DP variant: nothing spent
    assert [r["variant"] for r in rows] == ["fedavg", "fedbn", "centralized"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    central = folder / "runs" / "centralized"
    assert (central / "model.safetensors").is_file()
    n_test = sum(sum(row) for row in json.loads((central / "metrics.json").read_text())
                 ["test"]["confusion_matrix"])
    shards = json.loads((folder / "data" / "shards.json").read_text())
    assert n_test == sum(shards["counts"]["test"].values())  # same held-out split for every row
    assert "| centralized |" in (folder / "comparison.md").read_text()
