"""Hospitals pinned to the node where their data lives: the resource check without Ray, then
a real three-node loopback cluster (ray.cluster_utils) in a subprocess of its own, since this
pytest process may already hold the session's single-node Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fedray.federation import runtime
from fedray.config import load_config
from fedray.data import sites, synth

from conftest import tiny_config

NAMES = ["hospital_a", "hospital_b"]
HEAD = {"CPU": 1.0, "memory": 1e9, "node:127.0.0.1": 1.0, "node:__internal_head__": 1.0}
SITE_A = {"CPU": 1.0, "memory": 1e9, "node:127.0.0.1": 1.0, "hospital_a": 1.0}
SITE_B = {"CPU": 2.0, "GPU": 1.0, "node:127.0.0.1": 1.0, "hospital_b": 1.0}


def _runtime(**sets: object):
    return load_config(None, [f"runtime.{k}={v}" for k, v in sets.items()]).runtime


# ---------------------------------------------------------------- the pure part, no Ray

def test_pin_asks_each_hospital_for_its_own_resource() -> None:
    assert runtime.hospital_resources(_runtime(), NAMES) == {"hospital_a": {}, "hospital_b": {}}
    pinned = runtime.hospital_resources(_runtime(pin_hospitals_to_nodes="true"), NAMES)
    assert pinned == {n: {n: runtime.PIN_AMOUNT} for n in NAMES}
    explicit = _runtime(pin_hospitals_to_nodes="true",
                        hospital_resources="{hospital_b: {site_2: 1, gpu_box: 0.5}}")
    assert runtime.hospital_resources(explicit, NAMES)["hospital_b"] == {"site_2": 1,
                                                                         "gpu_box": 0.5}


@pytest.mark.parametrize("value, message", [
    ("{hospital_z: {x: 1}}", "names hospital_z, which is not a hospital"),
    ("{hospital_a: {CPU: 1}}", "CPU is not a custom resource"),
    ("{hospital_a: {site: 0}}", "amount of site must be > 0"),
])
def test_bad_hospital_resources_are_named(value: str, message: str) -> None:
    with pytest.raises(runtime.StartupError, match=message):
        runtime.hospital_resources(_runtime(hospital_resources=value), NAMES)


def test_unpinned_hospitals_spread_pinned_ones_share_their_site() -> None:
    nodes = [HEAD, SITE_A, SITE_B]
    spread = runtime.hospital_placements(_runtime(), NAMES, nodes)
    assert {p.num_cpus for p in spread.values()} == {2.0}  # 4 CPUs shared evenly, as before
    assert spread["hospital_a"].options()["scheduling_strategy"] == "SPREAD"

    pinned = runtime.hospital_placements(_runtime(pin_hospitals_to_nodes="true"), NAMES, nodes)
    # no hospital_num_cpus: each takes its own site's CPUs, not a share of the whole cluster
    assert (pinned["hospital_a"].num_cpus, pinned["hospital_b"].num_cpus) == (1.0, 2.0)
    opts = pinned["hospital_b"].options()
    assert opts["resources"] == {"hospital_b": runtime.PIN_AMOUNT}
    assert "scheduling_strategy" not in opts
    assert pinned["hospital_b"].demand() == {"CPU": 2.0, "hospital_b": runtime.PIN_AMOUNT}
    assert runtime.unplaceable({n: p.demand() for n, p in pinned.items()}, nodes) == {}


def test_missing_resource_names_the_hospital_and_what_the_cluster_advertises() -> None:
    problems = runtime.unplaceable(
        {"hospital_a": {"CPU": 1, "hospital_a": 0.001}, "hospital_c": {"CPU": 1, "hospital_c": 1}},
        [HEAD, SITE_A, SITE_B])
    assert list(problems) == ["hospital_c"]
    assert "hospital hospital_c requires the custom resource hospital_c" in problems["hospital_c"]
    assert "advertised: hospital_a, hospital_b" in problems["hospital_c"]
    assert "node:" not in problems["hospital_c"]


def test_resources_that_exist_but_not_together_or_not_enough() -> None:
    nodes = [HEAD, SITE_A, SITE_B]
    apart = runtime.unplaceable({"h": {"hospital_a": 1, "hospital_b": 1}}, nodes)
    assert "no single node advertises all of it" in apart["h"]
    small = runtime.unplaceable({"h": {"CPU": 4, "hospital_a": 0.001}}, nodes)
    assert "largest node that could host it has {CPU: 1, hospital_a: 1}" in small["h"]
    gpu = runtime.unplaceable({"h": {"CPU": 1, "GPU": 1, "hospital_a": 0.001}}, nodes)
    assert "GPU: 0" in gpu["h"] and "hospital_num_gpus" in gpu["h"]
    assert runtime.unplaceable({"h": {"CPU": 1, "GPU": 1}}, nodes) == {}  # SITE_B has both


# ---------------------------------------------------------------- a real multi-node cluster

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path

    import fedray  # loopback-only Ray settings before Ray is imported
    import ray
    from ray.cluster_utils import Cluster

    config_path, sites_root, run_dir, audit_dir = sys.argv[1:5]
    out = {}

    def audit():
        # In every process: record each file or folder opened under the sites' root.
        import os, sys
        root, folder = os.environ["AUDIT_ROOT"], os.environ["AUDIT_DIR"]
        log = open(os.path.join(folder, f"{os.getpid()}.log"), "a")

        def hook(event, args):
            if event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None \\
                    and isinstance(args[0], (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(args[0]))
                if path.startswith(root) and "/.fedray-state" not in path:
                    log.write(path + "\\n")
                    log.flush()
        sys.addaudithook(hook)

    os.environ.update(AUDIT_ROOT=sites_root, AUDIT_DIR=audit_dir)
    audit()  # the driver, which hosts the coordinator here
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        for site in ("hospital_a", "hospital_b"):  # the sites boot while torch is imported
            cluster.add_node(wait=False, num_cpus=1, resources={site: 1},
                             node_ip_address="127.0.0.1")
        from fedray.federation import runtime
        from fedray.config import load_config
        from fedray.federation.coordinator import Coordinator

        def config(*sets):
            return load_config(Path(config_path), list(sets))

        def kill(pool):
            pool.kill()

        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={
            "worker_process_setup_hook": audit,
            "env_vars": {"AUDIT_ROOT": sites_root, "AUDIT_DIR": audit_dir}})
        nodes = [n for n in ray.nodes() if n["Alive"]]
        out["addresses"] = sorted({n["NodeManagerAddress"] for n in nodes})
        out["expected"] = {r: n["NodeID"] for n in nodes for r in n["Resources"]
                           if r.startswith("hospital_")}

        # a site whose node is not in the cluster: refused before any actor exists
        start = time.monotonic()
        try:
            runtime.RayPool(config("runtime.pin_hospitals_to_nodes=true",
                                   "runtime.hospital_resources={hospital_b: {hospital_c: 1}}"),
                            None, Path(run_dir))
            out["missing"] = {"error": None}
        except runtime.StartupError as exc:
            out["missing"] = {"error": str(exc), "seconds": time.monotonic() - start}

        # each hospital pinned to its own site's node, reading its own folder; one round of
        # training and the federated evaluation, the coordinator in this (the driver's) process
        pinned = config("runtime.pin_hospitals_to_nodes=true")
        pool = runtime.RayPool(pinned, None, Path(run_dir))
        info = pool.wait_ready()
        out["pinned"] = {name: i["node_id"] for name, i in info.items()}
        out["pids"] = {name: i["pid"] for name, i in info.items()}
        out["driver_pid"] = os.getpid()
        out["splits"] = {name: i.get("splits") for name, i in info.items()}
        coordinator = Coordinator(pinned, Path(run_dir), pool, None, num_threads=1)
        coordinator.run_round()
        final = coordinator.finish()
        out["final"] = {"sites": sorted(final["sites"]), "worst_site": final["worst_site"],
                        "test_n": final["test"]["n"]}
        kill(pool)

        # both ask for all of site a: one waits for a node that never frees, until the timeout
        start = time.monotonic()
        pool = runtime.RayPool(config(
            "runtime.hospital_resources={hospital_a: {hospital_a: 1}, hospital_b: {hospital_a: 1}}",
            "runtime.start_timeout_s=4"), None, Path(run_dir))
        try:
            pool.wait_ready()
            out["timeout"] = {"error": None}
        except runtime.StartupError as exc:
            out["timeout"] = {"error": str(exc), "seconds": time.monotonic() - start}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out), flush=True)
""")


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("placement")
    base = tiny_config(tmp)
    folders = sites.split_sites(synth.generate(n=160, size=32, seed=1, patients_per_class=8),
                                base.data, 2, base.seed, tmp / "sites", layout="folder")
    config = tiny_config(tmp, **{"data.source": "sites", "data.sites": json.dumps(
        {name: {"path": str(folder), "state_dir": str(tmp / "state" / name)}
         for name, folder in folders.items()})})
    (tmp / "exp.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    (tmp / "audit").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    args = [str(tmp / "exp.yaml"), str((tmp / "sites").resolve()), str(tmp / "run"),
            str(tmp / "audit")]
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).parents[1], start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # the cluster's processes are in its process group (and die with their parents)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the cluster scenario hung:\n{stderr[-4000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"rc {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    opened: dict[int, set[str]] = {}
    for log in (tmp / "audit").glob("*.log"):
        opened[int(log.stem)] = {Path(p).relative_to((tmp / "sites").resolve()).parts[0]
                                 for p in log.read_text().splitlines()}
    result["opened"] = opened
    return result


@pytest.mark.slow
def test_cluster_is_on_loopback(cluster_run) -> None:
    assert cluster_run["addresses"] == ["127.0.0.1"]


@pytest.mark.slow
def test_each_hospital_runs_on_its_own_sites_node(cluster_run) -> None:
    expected = cluster_run["expected"]
    assert set(expected) == {"hospital_a", "hospital_b"}
    assert expected["hospital_a"] != expected["hospital_b"]
    assert cluster_run["pinned"] == {name: expected[name] for name in ("hospital_a", "hospital_b")}


@pytest.mark.slow
def test_missing_resource_fails_at_start_naming_the_hospital(cluster_run) -> None:
    missing = cluster_run["missing"]
    assert missing["error"] and missing["seconds"] < 30
    assert "hospital hospital_b requires the custom resource hospital_c" in missing["error"]
    assert "advertised: hospital_a, hospital_b" in missing["error"]


@pytest.mark.slow
def test_hospital_that_never_gets_a_node_times_out_by_name(cluster_run) -> None:
    late = cluster_run["timeout"]
    assert late["error"] and late["seconds"] < 30
    assert "did not start within runtime.start_timeout_s=4s" in late["error"]
    assert "hospital_a" in late["error"] or "hospital_b" in late["error"]
    assert "asks one node for {CPU: 1, hospital_a: 1}" in late["error"]


@pytest.mark.slow
def test_each_hospital_reads_only_its_own_site_and_the_coordinator_none(cluster_run) -> None:
    """An audit hook in every process of the cluster (the driver, which hosts the coordinator,
    and every Ray worker) records each file or folder opened under the sites' root.

    The pinned run's hospitals read exactly their own site. The timeout scenario's one
    hospital that gets a node may start reading its own site before the pool gives up on the
    other; which hospital that is, Ray decides, so of the processes outside the pinned run
    none reads more than one site."""
    opened, pids = cluster_run["opened"], cluster_run["pids"]
    assert opened.get(cluster_run["driver_pid"], set()) == set()
    for name, pid in pids.items():
        assert opened.get(pid) == {name}, (name, opened)
    others = {pid: sites for pid, sites in opened.items()
              if pid not in pids.values() and pid != cluster_run["driver_pid"]}
    assert all(len(s) <= 1 for s in others.values()), others


@pytest.mark.slow
def test_site_run_reports_counts_and_per_site_metrics(cluster_run) -> None:
    splits = cluster_run["splits"]
    assert set(splits) == {"hospital_a", "hospital_b"}
    for counts in splits.values():
        assert set(counts) == {"train", "val", "test"}
        assert all(isinstance(n, int) for split in counts.values() for n in split.values())
    final = cluster_run["final"]
    assert final["sites"] == ["hospital_a", "hospital_b"]
    assert final["worst_site"]["hospital"] in {"hospital_a", "hospital_b"}
    assert final["test_n"] == sum(sum(c["test"].values()) for c in splits.values())
