"""Start-up: what each process imports, where the coordinator runs, and the start-up record."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedray.federation import runtime
from fedray.config import load_config

from conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent

# What a hospital actor (it imports fedray.federation.runtime for its class), `fedray train`'s command
# line and fedray.models load; one fresh interpreter answers all three.
PROBE = """
import json, sys
from fedray import cli
cli.build_parser(["train", "--config", "x.yaml"])
after_cli = set(sys.modules)
import fedray.models
after_models = set(sys.modules)
import fedray.federation.runtime
after_runtime = set(sys.modules)
print(json.dumps({"cli": sorted(after_cli), "models": sorted(after_models),
                  "runtime": sorted(after_runtime)}))
"""


@pytest.fixture(scope="module")
def imported() -> dict[str, set[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return {k: set(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def test_train_command_line_leaves_other_commands_unimported(imported) -> None:
    assert not {"fedray.experiments.tune", "fedray.serving", "fedray.submit", "fedray.artifacts.package",
                "fedray.report", "fedray.explain", "numpy"} & imported["cli"]


def test_models_registry_does_not_import_torchvision(imported) -> None:
    assert "torchvision" not in imported["models"]


def test_hospital_actor_module_loads_no_coordinator_dp_or_report_code(imported) -> None:
    heavy = {"fedray.federation.coordinator", "fedray.metrics", "sklearn", "opacus", "captum",
             "matplotlib", "fedray.report", "fedray.explain", "ray.tune", "ray.serve"}
    assert not heavy & imported["runtime"]


def test_full_parser_still_lists_every_command() -> None:
    from fedray import cli

    choices = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"train", "tune", "serve", "submit", "export"} <= set(choices)


def test_startup_times_split_launch_to_ready() -> None:
    times = runtime.startup_times(100.0, {"process_start": 90.0, "init_start": 104.0,
                                          "ready": 106.5})
    assert times == {"to_init_s": 4.0, "init_s": 2.5, "ready_s": 6.5, "prestarted": True}
    fresh = runtime.startup_times(100.0, {"process_start": 101.0, "init_start": 103.0,
                                          "ready": 104.0})
    assert fresh["prestarted"] is False and fresh["ready_s"] == 4.0


def test_coordinator_stays_an_actor_on_a_cluster_or_with_resources(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = load_config(None, []).runtime
    assert not runtime.coordinator_in_driver(load_config(None, ["runtime.address=ray://h:10001"]).runtime)
    assert not runtime.coordinator_in_driver(load_config(None, ["runtime.coordinator_num_cpus=1"]).runtime)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not runtime.coordinator_in_driver(local)
    monkeypatch.delenv("RAY_ADDRESS")
    import torch

    assert runtime.coordinator_in_driver(local) is (not torch.cuda.is_available())


@pytest.mark.ray
@pytest.mark.parametrize("overrides", [{}, {"runtime.coordinator_num_cpus": 0.5}],
                         ids=["coordinator-in-driver", "coordinator-actor"])
def test_run_records_its_startup(ray_session, tmp_path: Path, overrides: dict) -> None:
    from fedray.experiments import experiment

    lines: list[str] = []
    config = tiny_config(tmp_path, **overrides)
    result = experiment.run(config, log=lines.append)
    startup = json.loads((result.run_dir / experiment.STARTUP).read_text())
    assert startup == result.startup
    assert set(startup["hospitals"]) == {"hospital_a", "hospital_b"}
    assert startup["to_first_round_s"] <= result.seconds
    assert all(h["ready_s"] >= h["init_s"] > 0 for h in startup["hospitals"].values())
    assert startup["coordinator_in"] == (
        "driver" if runtime.coordinator_in_driver(config.runtime) else "actor")
    assert result.final["test"]["accuracy"] >= 0
    assert any(line.startswith("start-up: first round after") for line in lines)
    assert "to the first round" in next(x for x in lines if x.startswith("finished:"))


EXIT_PROBE = """
import atexit, pathlib, sys, threading
from fedray import cli
out = pathlib.Path(sys.argv[1])

def log(event):
    with open(out / "events", "a") as f:
        f.write(event + "\\n")

def main():
    atexit.register(lambda: ((out / "atexit").write_text("ran"), log("atexit")))
    if sys.argv[2] == "thread":  # still running when the command returns: it writes its file
        exiting = threading.Event()  # only once the process is on its way out (sys.exit)
        real_exit = sys.exit
        sys.exit = lambda code=None: (exiting.set(), real_exit(code))
        threading.Thread(target=lambda: (exiting.wait(), (out / "thread").write_text("done"))
                         ).start()
    if sys.argv[2] == "ray":  # a Ray this command started (its module, as entry sees it)
        import types
        ray = types.ModuleType("ray")
        ray.is_initialized = lambda: True
        ray.shutdown = lambda: log("ray.shutdown")
        sys.modules["ray"] = ray
    print("buffered, not flushed", end="")
    return 3

cli.main = main
cli.entry()
"""


@pytest.mark.parametrize("case", ["plain", "thread"])
def test_console_entry_exits_with_the_code_after_hooks_output_and_threads(tmp_path, case) -> None:
    out = subprocess.run([sys.executable, "-c", EXIT_PROBE, str(tmp_path), case], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and out.stdout == "buffered, not flushed"
    assert (tmp_path / "atexit").read_text() == "ran"
    if case == "thread":
        assert (tmp_path / "thread").read_text() == "done"


def test_console_entry_stops_the_ray_it_started_before_the_exit_hooks(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", EXIT_PROBE, str(tmp_path), "ray"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert (tmp_path / "events").read_text().split() == ["ray.shutdown", "atexit"]
