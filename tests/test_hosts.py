"""Worker processes that host hospitals: which hospitals share one (no Ray), then on the
session's Ray: shared hosts train every hospital, a host outlives a run only inside
`hosts.reusing()`, and a restarted or faulted host is never handed to the next run."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.exceptions import RayActorError

from fedray.config import load_config
from fedray.data.pipeline import build_shards
from fedray.federation import hosts, runtime
from fedray.federation.coordinator import Coordinator

from conftest import tiny_config

FOUR = ["hospital_a", "hospital_b", "hospital_c", "hospital_d"]


def _runtime(**sets: object):
    return load_config(None, [f"runtime.{k}={v}" for k, v in sets.items()]).runtime


def _even(cpus: float, names: list[str], **sets: object) -> dict[str, runtime.Placement]:
    return runtime.hospital_placements(_runtime(**sets), names, [{"CPU": cpus}])


def _groups(cpus: float, names: list[str], local: bool = True, **sets: object):
    placements = _even(cpus, names, **sets)
    return [(p.num_cpus, p.threads, members)
            for p, members in runtime.host_groups(names, placements, _runtime(**sets), local)]


def test_hospitals_outnumbering_local_cpus_share_one_process_per_cpu() -> None:
    assert _groups(2, FOUR) == [(1.0, 1, FOUR[:2]), (1.0, 1, FOUR[2:])]
    assert _groups(1, FOUR) == [(1.0, 1, FOUR)]
    # a CPU each or more: a process each, as on a cluster
    assert _groups(4, FOUR) == [(1.0, 1, [n]) for n in FOUR]
    assert _groups(8, FOUR) == [(2.0, 2, [n]) for n in FOUR]
    # not a whole factor (3 on 2 CPUs): sharing would leave one process with twice the work
    assert [m for _, _, m in _groups(2, FOUR[:3])] == [[n] for n in FOUR[:3]]


def test_a_cluster_pins_and_gpus_keep_a_process_per_hospital() -> None:
    assert [m for _, _, m in _groups(2, FOUR, local=False)] == [[n] for n in FOUR]
    pinned = _even(2, FOUR, pin_hospitals_to_nodes="true")
    groups = runtime.host_groups(FOUR, pinned, _runtime(pin_hospitals_to_nodes="true"), True)
    assert [m for _, m in groups] == [[n] for n in FOUR]
    gpus = _groups(2, FOUR, hospital_num_gpus=0.25)
    assert [m for _, _, m in gpus] == [[n] for n in FOUR]


def test_hospitals_per_process_is_the_users_to_set() -> None:
    assert _groups(8, FOUR, hospitals_per_process=3) == [(6.0, 6, FOUR[:3]), (2.0, 2, FOUR[3:])]
    assert _groups(2, FOUR, hospitals_per_process=1) == [(0.5, 1, [n]) for n in FOUR]
    with pytest.raises(Exception, match="hospitals_per_process"):
        _runtime(hospitals_per_process=0)


# ---------------------------------------------------------------- on the session's Ray

def _pool(config, shards, run_dir: Path) -> runtime.RayPool:
    pool = runtime.RayPool(config, shards, run_dir)
    pool.wait_ready()
    return pool


@pytest.mark.ray
def test_shared_hosts_train_each_hospital_on_its_own_shard(ray_session, tmp_path: Path,
                                                           synth_table) -> None:
    config = tiny_config(tmp_path, **{"federation.hospitals": 4, "runtime.hospital_num_cpus": 0.5,
                                      "data.partition.min_per_hospital": 5})
    shards = build_shards(synth_table, config.data, 4, config.seed, tmp_path / "data")
    pool = _pool(config, shards, tmp_path)
    try:
        assert len(pool.hosts) == 2  # 4 hospitals of half a CPU: 2 processes
        pids = {n: i["pid"] for n, i in pool.info.items()}
        assert pids["hospital_a"] == pids["hospital_b"] != pids["hospital_c"] == pids["hospital_d"]
        assert {n: i["num_samples"] for n, i in pool.info.items()} == {
            n: sum(shards.counts[n].values()) for n in shards.hospitals}
        record = Coordinator(config, tmp_path, pool, shards, num_threads=1).run_round()
        assert record["completed"] == FOUR and record["counted"]
        ledgers = pool.ledgers()
        assert set(ledgers) == set(FOUR)
    finally:
        pool.kill()


@pytest.mark.ray
def test_a_host_serves_the_next_run_only_inside_reusing(ray_session, tmp_path: Path,
                                                         synth_table, monkeypatch) -> None:
    config = tiny_config(tmp_path)
    shards = build_shards(synth_table, config.data, 2, config.seed, tmp_path / "data")
    hosts.forget_idle()
    with hosts.reusing():
        one = _pool(config, shards, tmp_path / "r3")
        pids = {i["pid"] for i in one.info.values()}
        assert not any(i["reused"] for i in one.info.values())
        one.close()
        two = _pool(config, shards, tmp_path / "r4")
        # the same processes, each with only the new run's hospital
        assert {i["pid"] for i in two.info.values()} == pids
        assert all(i["reused"] and i["started"]["process_start"] for i in two.info.values())
        record = Coordinator(config, tmp_path / "r4", two, shards, num_threads=1).run_round()
        assert record["completed"] == ["hospital_a", "hospital_b"]
        two.close()
        # a run with injected faults takes an idle process, but does not hand it on: a fault
        # may leave it hung
        # (both hospitals in one process of the same shape: it takes one of the two)
        faulty = tiny_config(tmp_path, **{
            "runtime.hospital_num_cpus": 0.5, "runtime.hospitals_per_process": 2,
            "runtime.fault_injection": "[{process: hospital_a, point: before_fit, round: 1, "
                                       "action: hang}]"})
        hurt = _pool(faulty, shards, tmp_path / "rf")
        (taken,) = {i["pid"] for i in hurt.info.values()}
        assert taken in pids and not hurt.reusable
        hurt.close()
        assert len([h for hs in hosts._IDLE.values() for h in hs]) == 1
        with pytest.raises(RayActorError):
            ray_session.get(hurt.actors["hospital_a"].info.remote(), timeout=60)
        # other resources, all 4 CPUs: idle hosts are killed first, so the new ones find the
        # CPUs free
        wide = tiny_config(tmp_path, **{"runtime.hospital_num_cpus": 2})
        three = _pool(wide, shards, tmp_path / "r5")
        assert not pids & {i["pid"] for i in three.info.values()}
        assert not any(hosts._IDLE.values())
    with monkeypatch.context() as outside:
        outside.setattr(hosts, "_SCOPES", [0])  # the suite's own reusing() scope set aside
        three.close()  # outside reusing(): the processes end
        assert not any(hosts._IDLE.values())
        for name in three.names:
            with pytest.raises(RayActorError):
                ray_session.get(three.actors[name].info.remote(), timeout=60)


@pytest.mark.ray
def test_a_restarted_host_is_not_handed_on(ray_session, tmp_path: Path, synth_table) -> None:
    """hospital_b's process is killed and Ray restarts it; the hospital is built again there
    at its next call, and at the run's end that process is killed, not kept, even inside
    reusing(); hospital_a's is kept."""
    import psutil  # Ray's vendored copy, on the path once ray is imported

    config = tiny_config(tmp_path, **{"runtime.max_restarts": 1})
    shards = build_shards(synth_table, config.data, 2, config.seed, tmp_path / "data")
    hosts.forget_idle()
    with hosts.reusing():
        clean = _pool(config, shards, tmp_path / "clean")
        victim = clean.process("hospital_b")
        before = ray_session.get(clean.actors["hospital_b"].info.remote())["pid"]
        ray_session.kill(victim, no_restart=False)  # a crash Ray restarts
        try:  # gone, so that no ping reaches the old process
            psutil.Process(before).wait(timeout=60)
        except psutil.NoSuchProcess:
            pass
        alive, failures = clean._reachable(["hospital_b"], 60)  # waits out the restart
        assert alive == ["hospital_b"] and not failures
        after = ray_session.get(clean.actors["hospital_b"].info.remote())
        assert after["pid"] != before and after["hospital"] == "hospital_b"  # rebuilt lazily
        clean.close()
        kept = [h._actor_id for hs in hosts._IDLE.values() for h, _ in hs]
        assert kept == [clean.process("hospital_a")._actor_id]


def test_runs_with_injected_faults_or_in_a_trial_keep_no_host() -> None:
    plain = load_config(None, [])
    assert runtime.keeps_hosts(plain, None)
    faulty = load_config(None, ['runtime.fault_injection=[{process: hospital_a, '
                                'point: before_fit, round: 1, action: hang}]'])
    assert not runtime.keeps_hosts(faulty, None)
    assert not runtime.keeps_hosts(plain, object())  # inside a Tune trial's placement group


def test_planned_names_are_the_simulated_sites_names() -> None:
    from fedray.federation import placement

    assert placement.hospital_names(load_config(None, ["federation.hospitals=3"])) == [
        "hospital_a", "hospital_b", "hospital_c"]
    assert placement.hospital_names(load_config(None, []), ["b", "a"]) == ["a", "b"]
    sites = load_config(None, ["federation.hospitals=2", "data.source=sites",
                               "data.sites.site_b.path=b", "data.sites.site_a.path=a"])
    assert placement.hospital_names(sites, ["ignored"]) == ["site_a", "site_b"]


@pytest.mark.ray
def test_a_run_takes_the_processes_started_for_it(ray_session, tmp_path: Path,
                                                  synth_table) -> None:
    """experiment.run starts its hospitals' processes before it reads its data; the pool then
    takes exactly those, and a process started for another plan is killed, not leaked."""
    from fedray.federation import placement

    config = tiny_config(tmp_path)
    shards = build_shards(synth_table, config.data, 2, config.seed, tmp_path / "data")
    hosts.forget_idle()
    plan = placement.plan_hosts(config, placement.hospital_names(config, list(shards.hospitals)))
    assert plan.names == ["hospital_a", "hospital_b"] and len(plan.options) == 2
    hosts.prestart(plan.options, plan.takes_idle)
    started = [h._actor_id for h, _ in hosts._PRESTARTED]
    pool = _pool(config, shards, tmp_path / "run")
    try:
        assert [pool.process(n)._actor_id for n in pool.names] == started
        assert hosts._PRESTARTED == []
    finally:
        pool.kill()
    other = tiny_config(tmp_path, **{"runtime.hospital_num_cpus": 2})
    hosts.prestart(placement.plan_hosts(other, plan.names[:1]).options, True)
    stray = [h for h, _ in hosts._PRESTARTED]
    hosts.forget_idle()
    for host in stray:
        with pytest.raises(RayActorError):
            ray_session.get(host.release.remote([]), timeout=60)
