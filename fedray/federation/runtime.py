"""The Ray edge: hospitals' processes, the coordinator's, timeouts and restarts (where they
run and with what resources: placement.py). Nothing else in fedray imports Ray's actor API;
hospitals and the coordinator stay plain classes.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fedray.federation import hosts
from fedray.federation.placement import (  # noqa: F401 - re-exported: runtime.<name>
    PIN_AMOUNT, HostPlan, Placement, StartupError, bundle_placements, format_resources,
    hospital_names, hospital_placement, hospital_placements, hospital_resources, host_groups,
    init_ray, keeps_hosts, live_nodes, plan_hosts, unplaceable)
from fedray.federation.hosts import HospitalHandle, HospitalSpec, process_started
from fedray.config import ExperimentConfig, RuntimeConfig
from fedray.artifacts import run_folder as rf
from fedray.data.shards import ShardSet
from fedray.federation.messages import Failure, FitIns, FitRes
from fedray.privacy.errors import PrivacyBudgetExhausted


def startup_times(launched: float, times: dict[str, float | None]) -> dict[str, float | bool]:
    """Seconds of one actor's start-up from the wall-clock stamps it recorded.

    `to_init_s`: from its launch (the .remote() call) to its __init__ running: a worker
    process started or taken from the idle pool, fedray imported, the arguments unpickled.
    `init_s`: its own __init__ (shard decoding, model build). `ready_s`: the two together.
    `prestarted`: the worker process existed well before the launch (Ray's idle pool); a
    process's start time is read from the kernel's clock, which may differ from time.time()
    by a fraction of a second, so one started within a second of the launch is not counted.
    """
    begun, ready, process = times["init_start"], times["ready"], times.get("process_start")
    return {"to_init_s": max(0.0, begun - launched), "init_s": ready - begun,
            "ready_s": max(0.0, ready - launched),
            "prestarted": process is not None and process < launched - 1.0}


def hospital_state_dir(config: ExperimentConfig, run_dir: Path, name: str) -> Path:
    """Where a hospital keeps its optimizer state, ledger and local model: in site mode at the
    site (data.sites.<name>.state_dir, or .fedray-state/<run> in its own folder), never in the
    shared run folder; otherwise hospitals/<name> in the run folder."""
    site = config.data.sites.get(name) if config.data.source == "sites" else None
    if site is None:
        return rf.hospital_dir(run_dir, name)
    return Path(site.state_dir or Path(site.path) / ".fedray-state") / Path(run_dir).name


class RayPool:
    """Hospital actors, created once for the run and kept until it ends.

    Creating the pool does not wait for the actors: they import, decode their shards and build
    their models while the coordinator starts; `wait_ready` (called by the coordinator) does.
    """

    def __init__(self, config: ExperimentConfig, shards: ShardSet | None, run_dir: Path,
                 plan: HostPlan | None = None) -> None:
        rt = config.runtime
        sites = config.data.source == "sites"
        if plan is None:  # experiment.run plans once, before it starts the processes
            plan = plan_hosts(config, hospital_names(
                config, None if sites else list(shards.hospitals)))
        self.names, self.placements, self.reusable = plan.names, plan.placements, plan.reusable
        groups, wanted = plan.groups, plan.options
        self.launched = time.time()
        self.hosts: list[tuple[ray.actor.ActorHandle, dict, list[str]]] = []
        self.actors: dict[str, HospitalHandle] = {}
        for (placement, members), options, host in zip(
                groups, wanted, hosts.acquire(wanted, plan.takes_idle)):
            keys = []
            for name in members:
                spec = HospitalSpec(
                    key=f"{run_dir}/{name}", name=name,
                    shard_path=None if sites else str(shards.path(shards.hospitals[name])),
                    config=config, state_dir=str(hospital_state_dir(config, run_dir, name)),
                    threads=placement.threads)
                ref = ray.put(spec)
                host.open.remote(ref)  # loads while the coordinator builds
                self.actors[name] = HospitalHandle(host, ref)
                keys.append(spec.key)
            self.hosts.append((host, options, keys))
        self.info: dict[str, dict] = {}
        self.restart_wait_s = rt.restart_wait_s
        self.start_timeout_s = rt.start_timeout_s

    def wait_ready(self) -> dict[str, dict]:
        """Block until every hospital has loaded its shard; name the first that could not.

        A hospital still not started after `runtime.start_timeout_s` (no free node with its
        resources, or still loading) is a StartupError too. On a StartupError the pool's
        actors are killed, so none is left waiting for a node.
        """
        deadline = time.monotonic() + self.start_timeout_s
        pending = {name: actor.info.remote() for name, actor in self.actors.items()}
        try:
            for name, ref in pending.items():
                try:
                    self.info[name] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except (RayActorError, RayTaskError) as exc:
                    raise StartupError(f"hospital {name} failed to start:\n{exc}") from exc
                except GetTimeoutError:
                    late = [n for n, r in pending.items() if n not in self.info
                            and not ray.wait([r], timeout=0)[0]] or [name]
                    raise StartupError(
                        f"hospital{'s' if len(late) > 1 else ''} {', '.join(late)} did not start "
                        f"within runtime.start_timeout_s={self.start_timeout_s:g}s; "
                        + "; ".join(f"{n} asks one node for "
                                    f"{format_resources(self.placements[n].demand())}"
                                    for n in late)
                        + " (no node with those resources free, or still loading its shard)"
                    ) from None
        except StartupError:
            self.kill()
            raise
        return self.info

    def startup(self) -> dict[str, dict[str, float | bool]]:
        """Each ready hospital's start-up seconds (see `startup_times`)."""
        return {name: startup_times(self.launched, info["started"])
                for name, info in sorted(self.info.items()) if "started" in info}

    def kill(self) -> None:
        """End every hospital's process now (no restart)."""
        for host, _, _ in self.hosts:
            ray.kill(host, no_restart=True)

    def close(self) -> None:
        """The run is over: its hosts drop their hospitals and wait for the next run (inside
        `hosts.reusing()`), or end (see hosts.release)."""
        hosts.release(self.hosts, self.reusable)

    def process(self, name: str) -> ray.actor.ActorHandle:
        """The actor (worker process) that holds hospital `name`."""
        return self.actors[name].host

    def _reachable(self, names: list[str], wait_s: float) -> tuple[list[str], list[Failure]]:
        """Hospitals that answer a ping (all pinged at once); one that Ray is still restarting
        gets up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        pings = {name: self.actors[name].info.remote() for name in names}
        alive, failures = [], []
        for name in names:
            while True:
                try:
                    ray.get(pings[name], timeout=max(0.1, deadline - time.monotonic()))
                    alive.append(name)
                    break
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        failures.append(Failure(name, "unavailable",
                                                f"hospital {name} still restarting after {wait_s:.0f}s"))
                        break
                    time.sleep(0.2)
                    pings[name] = self.actors[name].info.remote()
                except (RayActorError, GetTimeoutError) as exc:
                    failures.append(Failure(name, "died", f"hospital {name} is gone: {exc}"))
                    break
        return alive, failures

    def fit(self, weights: OrderedDict, instructions: dict[str, FitIns], timeout_s: float
            ) -> tuple[list[FitRes], list[Failure], dict[str, float]]:
        """Broadcast the weights once, gather what arrives before the deadline."""
        alive, failures = self._reachable(sorted(instructions), self.restart_wait_s)
        start = time.perf_counter()
        ref = ray.put(weights)
        timings = {"broadcast_s": time.perf_counter() - start}
        pending = {self.actors[name].fit.remote(ref, instructions[name]): name for name in alive}
        if not pending:
            return [], failures, timings
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        results = []
        for future in ready:
            name = pending[future]
            try:
                results.append(ray.get(future))
            except RayTaskError as exc:
                if isinstance(exc.cause, PrivacyBudgetExhausted):
                    failures.append(Failure(name, "budget", str(exc.cause)))
                else:
                    failures.append(Failure(name, "error", f"hospital {name} raised:\n{exc}"))
            except RayActorError as exc:
                failures.append(Failure(name, "died", f"hospital {name} died: {exc}"))
        for future in late:
            failures.append(Failure(pending[future], "timeout",
                                    f"hospital {pending[future]} missed the {timeout_s:.0f}s deadline"))
        return results, failures, timings

    def restore(self, round_number: int) -> list[dict]:
        return ray.get([a.restore.remote(round_number) for a in self.actors.values()])

    def ledgers(self) -> dict[str, dict | None]:
        """Each hospital's ledger as it stands; waits for a late fit still spending budget."""
        names, _ = self._reachable(list(self.actors), self.restart_wait_s)  # a restart, too
        return dict(zip(names, ray.get([self.actors[n].privacy_ledger.remote() for n in names])))

    def save_local_models(self) -> None:
        ray.get([a.save_local_model.remote() for a in self.actors.values()])

    def evaluate(self, weights: OrderedDict, split: str) -> dict[str, dict | None]:
        """Every reachable hospital's sufficient statistics of `weights` on its local `split`
        (the weights broadcast once); a hospital that cannot answer is left out and named."""
        names, failures = self._reachable(self.names, self.restart_wait_s)
        ref = ray.put(weights)
        pending = {name: self.actors[name].evaluate.remote(ref, split) for name in names}
        out: dict[str, dict | None] = {}
        for name, future in pending.items():
            try:
                out[name] = ray.get(future)
            except (RayTaskError, RayActorError) as exc:
                failures.append(Failure(name, "error", f"hospital {name} could not evaluate: {exc}"))
        for failure in failures:
            print(f"federated evaluation ({split}): {failure.message}", flush=True)
        return out

    def ask(self, method: str, *args) -> dict[str, object]:
        """Call one method on every hospital at once (arguments put in the store once)."""
        refs = [ray.put(a) for a in args]
        return dict(zip(self.names, ray.get([getattr(self.actors[n], method).remote(*refs)
                                             for n in self.names])))

    def image_hashes(self) -> dict[str, list[str]]:
        return dict(zip(self.names, ray.get([self.actors[n].image_hashes.remote()
                                             for n in self.names])))


class CoordinatorHost:
    """What runs the coordinator, in its own actor or in the driver: it builds the global
    model and decodes the evaluation shards while the hospitals start, then waits for them.

    `fedray.federation.coordinator` (scikit-learn's metrics with it) is imported here, not at the top of
    this module, so hospital actors, which import this module for their class, never load it.
    """

    def __init__(self, config: ExperimentConfig, run_dir: str, shard_root: str | None,
                 pool: RayPool, resume: bool, num_threads: int | None,
                 launched: float | None = None) -> None:
        begun = time.time()
        from fedray.federation.coordinator import Coordinator

        self.pool = pool
        try:
            shards = ShardSet.load(Path(shard_root)) if shard_root else None
            self.coordinator = Coordinator(config, Path(run_dir), self.pool, shards,
                                           num_threads=num_threads)
        except BaseException:
            self.pool.kill()
            raise
        built = time.time()
        self.pool.wait_ready()
        self.resumed_from = self.coordinator.resume() if resume else 0
        self.started = {"process_start": process_started(), "init_start": begun, "built": built,
                        "ready": time.time(), "launched": launched if launched else begun}

    def hospitals(self) -> dict[str, dict]:
        return self.pool.info

    def startup(self) -> dict:
        """Start-up seconds of the coordinator (`build_s`: its imports, global model and
        evaluation shards) and of each hospital, from their launches (see `startup_times`)."""
        t = self.started
        own = startup_times(t["launched"], {**t, "ready": t["built"]})
        own["build_s"] = own.pop("init_s")
        del own["prestarted"]  # said of hospitals' workers; this may be the driver
        own["ready_s"] = max(0.0, t["ready"] - t["launched"])  # hospitals waited for too
        return {"coordinator": own, "hospitals": self.pool.startup()}

    def start_round(self) -> int:
        return self.coordinator.round

    def run_round(self) -> dict | None:
        return self.coordinator.run_round()

    def finish(self) -> dict:
        return self.coordinator.finish()


class CoordinatorActor:
    """The coordinator in an actor of its own: on a cluster, inside a Tune trial, or when it
    asks for resources (runtime.coordinator_num_cpus / _gpus)."""

    where = "actor"

    def __init__(self, handle: ray.actor.ActorHandle, pool: RayPool) -> None:
        self.handle = handle
        self.pool = pool

    def start_round(self) -> int:
        return call(self.handle.start_round)

    def run_round(self) -> dict | None:
        return call(self.handle.run_round)

    def finish(self) -> dict:
        return call(self.handle.finish)

    def startup(self) -> dict:
        return call(self.handle.startup)

    def hospitals(self) -> dict[str, dict]:
        return call(self.handle.hospitals)

    def close(self) -> None:
        ray.kill(self.handle)
        self.pool.close()


class DriverCoordinator:
    """The coordinator in the driver's own process (a local Ray): one Python process fewer to
    start and import on a machine the hospitals already share. Hospitals stay actors."""

    where = "driver"

    def __init__(self, host: CoordinatorHost, threads_before: int) -> None:
        self.host = host
        self.threads_before = threads_before

    def start_round(self) -> int:
        return self.host.start_round()

    def run_round(self) -> dict | None:
        return self.host.run_round()

    def finish(self) -> dict:
        return self.host.finish()

    def startup(self) -> dict:
        return self.host.startup()

    def hospitals(self) -> dict[str, dict]:
        return self.host.hospitals()

    def close(self) -> None:
        import torch

        self.host.pool.close()
        torch.set_num_threads(self.threads_before)  # the coordinator set the driver's


def coordinator_in_driver(rt: RuntimeConfig) -> bool:
    """Whether this run hosts its coordinator in the driver: `runtime.coordinator: driver`, or
    (auto) either a Tune trial whose coordinator asks for no GPU, or a local Ray (no
    runtime.address, no RAY_ADDRESS) with no resources asked for the coordinator and no GPU
    visible to the driver (a coordinator actor without GPUs evaluates on the CPU; so does this
    one).

    A trial's process is already a Ray actor beside the trial's placement group, and its
    working directory (which Tune uploads to remote storage) is where the run folder is
    written: a coordinator in it costs no process start and writes the run folder on the
    trial's own node. Its bundle 0 stays reserved for it, unused by any actor. Only a bundle
    with GPUs needs an actor to hold them."""
    if rt.coordinator != "auto":  # a cluster job whose driver holds the run folder's volume
        return rt.coordinator == "driver"
    if ray.is_initialized() and get_current_placement_group() is not None:
        return not rt.coordinator_num_gpus
    if rt.address or os.environ.get("RAY_ADDRESS"):
        return False
    if rt.coordinator_num_cpus or rt.coordinator_num_gpus:
        return False
    import torch

    return not torch.cuda.is_available()


def launch_coordinator(config: ExperimentConfig, run_dir: Path, shards: ShardSet | None,
                       resume: bool = False, plan: HostPlan | None = None
                       ) -> CoordinatorActor | DriverCoordinator:
    """The hospital actors and the coordinator, all starting at once.

    A local run keeps the coordinator in the driver (`coordinator_in_driver`), which builds it
    while the hospital actors start and returns once they are ready. Otherwise the coordinator
    is an actor; its CPUs are logical only: it evaluates while the hospitals are idle. Inside
    a trial's placement group it threads for the trial's CPUs, not the cluster's, and an actor
    coordinator takes bundle 0.
    """
    rt = config.runtime
    pool = RayPool(config, shards, run_dir, plan)
    group = get_current_placement_group()
    if group is not None:
        bundles = group.bundle_specs
        options = {"num_cpus": bundles[0].get("CPU", 0.0), "num_gpus": bundles[0].get("GPU", 0.0),
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       group, placement_group_bundle_index=0)}
        cpus = sum(b.get("CPU", 0.0) for b in bundles)
    else:
        options = {"num_cpus": rt.coordinator_num_cpus, "num_gpus": rt.coordinator_num_gpus}
        cpus = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
    threads = max(1, int(cpus))
    shard_root = str(shards.root) if shards is not None else None
    if coordinator_in_driver(rt):
        import torch

        before = torch.get_num_threads()
        try:
            host = CoordinatorHost(config, str(run_dir), shard_root, pool, resume, threads)
        except BaseException:
            torch.set_num_threads(before)
            raise
        return DriverCoordinator(host, before)
    remote = ray.remote(CoordinatorHost).options(max_restarts=0, **options)
    return CoordinatorActor(remote.remote(config, str(run_dir), shard_root, pool, resume,
                                          threads, time.time()), pool)


def evaluate_at_sites(config: ExperimentConfig, weights: dict, split: str = "test",
                      work_dir: Path | None = None) -> dict[str, dict]:
    """Score one model at every site of `config` (site mode) on its local `split`: each site's
    hospital evaluates it where the data lives and sends counts; returns per-site metrics and
    the pooled ones under "pooled". For local-only baselines and models made elsewhere."""
    import tempfile
    from collections import OrderedDict

    from fedray.config import ConfigError
    from fedray.data.labels import CLASSES
    from fedray.metrics import add_stats, metrics_from_stats

    if config.data.source != "sites":
        raise ConfigError("evaluate_at_sites needs data.source: sites")
    init_ray(config.runtime)
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        pool = RayPool(config, None, Path(scratch))
        try:
            pool.wait_ready()
            stats = {h: st for h, st in pool.evaluate(OrderedDict(weights), split).items() if st}
        finally:
            pool.close()
    out = {h: metrics_from_stats(st, list(CLASSES)) for h, st in sorted(stats.items())}
    if stats:
        out["pooled"] = metrics_from_stats(add_stats(list(stats.values())), list(CLASSES))
    return out


def call(handle_method, *args, timeout: float | None = None):
    """ray.get that re-raises an actor's error as its original type (message and traceback
    kept), so a bad config or shard reads the same on Ray as in-process."""
    try:
        return ray.get(handle_method.remote(*args), timeout=timeout)
    except RayTaskError as exc:
        raise exc.as_instanceof_cause() from None
