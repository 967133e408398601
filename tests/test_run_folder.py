"""The run folder read back from disk alone: its config, its model and its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from fedray.artifacts import checkpoint, run_folder
from fedray.config import load_config
from fedray.federation.messages import to_torch

from test_report import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_table: pa.Table) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "tiny", synth_table, rounds=2)


def test_the_run_folder_names_what_a_run_writes(run: Path) -> None:
    assert run_folder.is_run(run) and not run_folder.is_run(run / run_folder.DATA)
    for name in (run_folder.CONFIG, run_folder.METRICS, run_folder.METRICS_JSONL,
                 run_folder.MODEL, f"{run_folder.DATA}/{run_folder.SHARDS}"):
        assert (run / name).is_file(), name
    assert run_folder.load_run_config(run) == load_config(run / "config.yaml")


def test_model_from_run_is_the_saved_model(run: Path) -> None:
    model = run_folder.model_from_run(run)
    saved = to_torch(checkpoint.load_weights(run / run_folder.MODEL))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert run_folder.run_weights(run) == run / run_folder.MODEL


def test_evaluate_run_scores_the_saved_model_as_the_run_did(run: Path) -> None:
    metrics = run_folder.evaluate_run(run, "test")
    final = json.loads((run / run_folder.METRICS).read_text())
    assert metrics["accuracy"] == pytest.approx(final["test"]["accuracy"])
    assert json.loads(run_folder.evaluation_path(run, "test").read_text()) == metrics


def test_an_unfinished_run_falls_back_to_its_newest_checkpoint(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "unfinished"
    copy.mkdir()
    (copy / run_folder.CONFIG).write_text((run / run_folder.CONFIG).read_text())
    rounds = run / run_folder.CHECKPOINTS
    newest = checkpoint.completed_rounds(rounds)[-1]
    target = checkpoint.round_dir(copy / run_folder.CHECKPOINTS, newest)
    target.mkdir(parents=True)
    source = checkpoint.round_dir(rounds, newest)
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    assert run_folder.run_weights(copy) == target / run_folder.GLOBAL_WEIGHTS
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        run_folder.run_weights(tmp_path)
