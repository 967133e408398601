"""Noise nobody can recompute: two DP runs of one config and seed release different weights;
only privacy.reproducible_noise (debugging) makes them equal, and then every output says so."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedray.experiments.experiment import progress_line

from conftest import local_coordinator

DP_SGD = {"model.dp_safe": True, "privacy.enabled": True, "privacy.noise_multiplier": 1.0}
DP_FEDAVG = {"model.dp_safe": True, "federation.strategy.name": "dpfedavg",
             "federation.strategy.clip_norm": 1.0, "federation.strategy.noise_multiplier": 1.0}


def one_run(run_dir, shard_dir, settings: dict) -> tuple[dict, dict, dict]:
    coord = local_coordinator(run_dir, shard_dir, **settings)
    record = coord.run_round()
    final = coord.finish()
    return dict(coord.weights), final, record


@pytest.mark.parametrize("settings", [DP_SGD, DP_FEDAVG], ids=["dp-sgd", "dp-fedavg"])
def test_two_dp_runs_release_different_weights_unless_noise_is_seeded(
        tmp_path, shard_dir, settings) -> None:
    a, final, record = one_run(tmp_path / "a", shard_dir, settings)
    b, _, _ = one_run(tmp_path / "b", shard_dir, settings)
    assert any(not np.array_equal(a[k], b[k]) for k in a if a[k].dtype.kind == "f")
    assert "warning" not in final["privacy"] and "dp_warning" not in record

    seeded = {**settings, "privacy.reproducible_noise": True}
    c, final, record = one_run(tmp_path / "c", shard_dir, seeded)
    d, _, _ = one_run(tmp_path / "d", shard_dir, seeded)
    for k in c:
        np.testing.assert_array_equal(c[k], d[k], err_msg=k)
    assert "NOT a privacy guarantee" in final["privacy"]["warning"]
    assert "NOT A GUARANTEE" in progress_line(record, 1)
    saved = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert saved["privacy"]["warning"] == final["privacy"]["warning"]


def test_plain_runs_stay_bit_identical(tmp_path, shard_dir) -> None:
    a, _, _ = one_run(tmp_path / "a", shard_dir, {})
    b, _, _ = one_run(tmp_path / "b", shard_dir, {})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
