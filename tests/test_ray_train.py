"""A real federated run on the session's local Ray (127.0.0.1): actors, object store, run folder."""

import json
import os
from pathlib import Path

import pytest
import yaml

from fedray.experiments import experiment
from fedray.cli import main as cli_main
from fedray.config import load_config
from fedray.data import synth

from conftest import tiny_config

pytestmark = pytest.mark.ray


def test_two_hospitals_one_round_on_ray(ray_session, tmp_path: Path) -> None:
    """`fedray train` on a pooled source divides it into site folders inside the run, then
    trains in site mode: each hospital reads its own folder; metrics are pooled from counts."""
    config = tiny_config(tmp_path)
    lines: list[str] = []
    result = experiment.run(config, log=lines.append)
    run = result.run_dir
    assert run.parent == tmp_path
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "model.safetensors",
                 "sites/hospital_a/manifest.parquet", "sites/hospital_b/manifest.parquet",
                 "data/sites.json", "ood.json"):
        assert (run / name).is_file(), name
    saved = load_config(run / "config.yaml")
    assert saved.data.source == "sites" and sorted(saved.data.sites) == ["hospital_a", "hospital_b"]
    assert saved.model == config.model and saved.federation == config.federation
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["completed"] == ["hospital_a", "hospital_b"]
    assert records[0]["num_samples"] == sum(h["num_samples"] for h in records[0]["hospitals"].values())
    final = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc_macro",
                "kappa", "confusion_matrix", "per_class"):
        assert key in final["test"], key
    n_test = sum(sum(row) for row in final["test"]["confusion_matrix"])
    counts = json.loads((run / "data/sites.json").read_text())["sites"]
    assert n_test == sum(sum(c["test"].values()) for c in counts.values())
    assert set(final["sites"]) == {"hospital_a", "hospital_b"} and final["worst_site"]
    assert any(line.startswith("round 1/1 | hospitals 2/2") for line in lines)
    assert any(line.startswith("site split") for line in lines)
    assert (run / "checkpoints" / "round_0001" / "global.safetensors").is_file()
    # hospital state stays with the site's state (here the simulated site's, in the run)
    assert (run / "hospitals" / "hospital_a" / run.name / "local_model.safetensors").is_file()


def test_hospitals_are_separate_processes_with_matched_threads(ray_session, tmp_path) -> None:
    from fedray.federation import runtime
    from fedray.data.pipeline import build_shards, load_source

    config = tiny_config(tmp_path)
    shards = build_shards(load_source(config.data, 0), config.data, 2, 0, tmp_path / "data")
    pool = runtime.RayPool(config, shards, tmp_path)
    pool.wait_ready()
    try:
        pids = {info["pid"] for info in pool.info.values()}
        assert len(pids) == 2 and os.getpid() not in pids
        assert all(info["threads"] == 1 for info in pool.info.values())
    finally:
        pool.kill()


def test_hospital_that_cannot_start_is_named(ray_session, tmp_path) -> None:
    from fedray.federation import runtime
    from fedray.data.pipeline import build_shards, load_source

    config = tiny_config(tmp_path)
    shards = build_shards(load_source(config.data, 0), config.data, 2, 0, tmp_path / "data")
    (tmp_path / "data" / "hospital_b.parquet").write_bytes(b"not parquet")
    with pytest.raises(runtime.StartupError, match="hospital_b failed to start"):
        runtime.RayPool(config, shards, tmp_path).wait_ready()


def test_cli_train_then_resume_then_evaluate(ray_session, tmp_path, capsys) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path).model_dump(mode="json")))
    assert cli_main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "runs")]) == 0
    run = next((tmp_path / "runs").iterdir())
    out = capsys.readouterr().out
    assert "round 1/1" in out and "balanced_accuracy" in out
    # extend the finished run by one round
    assert cli_main(["train", "--resume", str(run), "--set", "federation.rounds=2"]) == 0
    out = capsys.readouterr().out
    assert "resuming after round 1" in out and "round 2/2" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert cli_main(["evaluate", str(run)]) == 0
    assert json.loads((run / "evaluation_test.json").read_text())["n"] > 0
    assert cli_main(["report", str(run), "--explanations", "2"]) == 0
    html = (run / "report" / "report.html").read_text()
    assert "data:image/png;base64" in html and (run / "report" / "report.md").is_file()
    smear = tmp_path / "smear.png"
    smear.write_bytes(synth.generate(n=1, size=48, seed=3)["image"][0].as_py())
    assert cli_main(["explain", str(run), str(smear), "--output", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "smear_gradcam.png").is_file()
    assert (tmp_path / "exp" / "contact_sheet.png").is_file()
