"""The GPU benchmark's helpers that run here too: Ray's repacked wheel and a run's summary."""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import zipfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_recipe  # noqa: E402
import gpu_wheels  # noqa: E402


def _member(z: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    z.writestr(info, data)


def test_slim_ray_drops_the_java_workers_and_keeps_executables(tmp_path: Path) -> None:
    wheel = tmp_path / "ray-9.9.9-cp312-cp312-manylinux2014_x86_64.whl"
    files = {"ray/__init__.py": 0o644, "ray/core/src/ray/raylet/raylet": 0o755,
             "ray/_raylet.so": 0o755, "ray/jars/ray_dist.jar": 0o644}
    record = "".join(f"{name},sha256=x,1\n" for name in files) + "ray-9.9.9.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, mode in files.items():
            _member(z, name, b"x", mode)
        _member(z, "ray-9.9.9.dist-info/RECORD", record.encode(), 0o644)
    archive = gpu_wheels.slim_ray(wheel, tmp_path)
    assert archive.name == "ray-9.9.9-slim.tar.xz" and not wheel.exists()
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        kept_record = tar.extractfile("ray-9.9.9.dist-info/RECORD").read().decode()
    assert "ray/jars/ray_dist.jar" not in members and "ray/jars/" not in kept_record
    assert members["ray/core/src/ray/raylet/raylet"].mode & 0o777 == 0o755
    assert members["ray/_raylet.so"].mode & 0o777 == 0o755
    assert members["ray/__init__.py"].mode & 0o111 == 0
    assert "ray/__init__.py" in kept_record


def _round(n: int, fit: float, hospitals: dict[str, float]) -> dict:
    return {"round": n, "num_samples": 400,
            "timings": {"fit_s": fit, "aggregate_s": 0.5, "evaluate_s": 1.5},
            "hospitals": {h: {"seconds": s, "loss": 1.0} for h, s in hospitals.items()}}


def test_summary_of_a_finished_and_of_a_stopped_run(tmp_path: Path) -> None:
    args = argparse.Namespace(local_epochs=5)
    rounds = [_round(1, 10.0, {"a": 9.0, "b": 8.0}), _round(2, 6.0, {"a": 5.0, "b": 6.0})]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    out: dict = {}
    gpu_recipe.summarise(tmp_path, args, out)  # stopped: no metrics.json, no startup.json yet
    assert out["rounds_run"] == 2 and out["round_s"] == [12.0, 8.0] and out["round_s_mean"] == 10.0
    assert out["slowest_hospital_fit_s"] == [9.0, 6.0]
    assert out["train_images_per_s"] == 400 * 5 * 2 / 15.0
    assert out["test"] == {} and out["stop_reason"] is None and out["to_first_round_s"] is None

    (tmp_path / "startup.json").write_text(json.dumps({"to_first_round_s": 7.5}))
    (tmp_path / "metrics.json").write_text(json.dumps({
        "stop_reason": "completed all rounds",
        "test": {"accuracy": 0.9, "balanced_accuracy": 0.8, "kappa": 0.7}}))
    gpu_recipe.summarise(tmp_path, args, out)
    assert out["to_first_round_s"] == 7.5 and out["stop_reason"] == "completed all rounds"
    assert out["test"] == {"accuracy": 0.9, "balanced_accuracy": 0.8}
