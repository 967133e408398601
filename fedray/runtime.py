"""The Ray edge: starting Ray, actor options, resources, timeouts and restarts. Nothing else
in fedray imports Ray's actor API; hospitals and the coordinator stay plain classes.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from fedray.client import HospitalClient
from fedray.config import ExperimentConfig, RuntimeConfig
from fedray.coordinator import Coordinator
from fedray.data.shards import ShardSet
from fedray.messages import Failure, FitIns, FitRes
from fedray.privacy import PrivacyBudgetExhausted


class StartupError(RuntimeError):
    """A hospital or coordinator that could not start; the message names it."""


def init_ray(runtime: RuntimeConfig) -> None:
    """Join the configured cluster, or start a local Ray bound to loopback."""
    if ray.is_initialized():
        return
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=runtime.num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )


@dataclass(frozen=True)
class Placement:
    """Resources of one hospital actor and the torch threads that match its CPU share."""

    num_cpus: float
    num_gpus: float
    threads: int


def hospital_placement(runtime: RuntimeConfig, hospitals: int, cluster_cpus: float) -> Placement:
    """Share the CPUs evenly by default, so every hospital trains at once and none waits."""
    cpus = runtime.hospital_num_cpus or max(cluster_cpus / hospitals, 0.01)
    return Placement(num_cpus=cpus, num_gpus=runtime.hospital_num_gpus,
                     threads=max(1, math.floor(cpus)))


class RayPool:
    """Hospital actors, created once for the run and kept until it ends.

    Creating the pool does not wait for the actors: they import, decode their shards and build
    their models while the coordinator starts; `wait_ready` (called by the coordinator) does.
    """

    def __init__(self, config: ExperimentConfig, shards: ShardSet, run_dir: Path) -> None:
        rt = config.runtime
        placement = hospital_placement(rt, len(shards.hospitals),
                                       ray.cluster_resources().get("CPU", os.cpu_count()))
        remote = ray.remote(HospitalClient)
        self.names = sorted(shards.hospitals)
        self.actors = {
            name: remote.options(
                name=None, num_cpus=placement.num_cpus, num_gpus=placement.num_gpus,
                max_restarts=rt.max_restarts, max_task_retries=0,
            ).remote(name, str(shards.path(shards.hospitals[name])), config,
                     str(run_dir / "hospitals" / name), placement.threads)
            for name in self.names
        }
        self.info: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        self.restart_wait_s = rt.restart_wait_s

    def wait_ready(self) -> dict[str, dict]:
        """Block until every hospital has loaded its shard; name the first that could not."""
        for name, actor in self.actors.items():
            try:
                self.info[name] = ray.get(actor.info.remote())
            except (RayActorError, RayTaskError) as exc:
                raise StartupError(f"hospital {name} failed to start:\n{exc}") from exc
        return self.info

    def _reachable(self, names: list[str], wait_s: float) -> tuple[list[str], list[Failure]]:
        """Hospitals that answer a ping; one Ray is still restarting gets up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        alive, failures = [], []
        for name in names:
            while True:
                try:
                    ray.get(self.actors[name].info.remote(),
                            timeout=max(0.1, deadline - time.monotonic()))
                    alive.append(name)
                    break
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        failures.append(Failure(name, "unavailable",
                                                f"hospital {name} still restarting after {wait_s:.0f}s"))
                        break
                    time.sleep(0.2)
                except (RayActorError, GetTimeoutError) as exc:
                    failures.append(Failure(name, "died", f"hospital {name} is gone: {exc}"))
                    break
        return alive, failures

    def fit(self, weights: OrderedDict, instructions: dict[str, FitIns],
            timeout_s: float) -> tuple[list[FitRes], list[Failure]]:
        """Broadcast the weights once, gather what arrives before the deadline."""
        alive, failures = self._reachable(sorted(instructions), self.restart_wait_s)
        start = time.perf_counter()
        ref = ray.put(weights)
        self.timings = {"broadcast_s": time.perf_counter() - start}
        pending = {self.actors[name].fit.remote(ref, instructions[name]): name for name in alive}
        if not pending:
            return [], failures
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
        return results, failures

    def restore(self, round_number: int) -> None:
        ray.get([a.restore.remote(round_number) for a in self.actors.values()])

    def save_local_models(self) -> None:
        ray.get([a.save_local_model.remote() for a in self.actors.values()])


class CoordinatorHost:
    """What the coordinator actor runs: it builds the hospital pool inside the actor."""

    def __init__(self, config: ExperimentConfig, run_dir: str, shard_root: str, pool: RayPool,
                 resume: bool, num_threads: int | None) -> None:
        shards = ShardSet.load(Path(shard_root))
        self.pool = pool
        self.pool.wait_ready()
        self.coordinator = Coordinator(config, Path(run_dir), self.pool, shards,
                                       num_threads=num_threads)
        self.resumed_from = self.coordinator.resume() if resume else 0

    def hospitals(self) -> dict[str, dict]:
        return self.pool.info

    def start_round(self) -> int:
        return self.coordinator.round

    def run_round(self) -> dict | None:
        return self.coordinator.run_round()

    def finish(self) -> dict:
        return self.coordinator.finish()


def launch_coordinator(config: ExperimentConfig, run_dir: Path, shards: ShardSet,
                       resume: bool = False) -> ray.actor.ActorHandle:
    """The hospital actors and the coordinator actor, all starting at once.

    The coordinator's CPUs are logical only: it evaluates while the hospitals are idle.
    """
    rt = config.runtime
    pool = RayPool(config, shards, run_dir)
    remote = ray.remote(CoordinatorHost).options(
        num_cpus=rt.coordinator_num_cpus, num_gpus=rt.coordinator_num_gpus, max_restarts=0)
    threads = max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))
    return remote.remote(config, str(run_dir), str(shards.root), pool, resume, threads)


def call(handle_method, *args, timeout: float | None = None):
    """ray.get that re-raises an actor's error as its original type (message and traceback
    kept), so a bad config or shard reads the same on Ray as in-process."""
    try:
        return ray.get(handle_method.remote(*args), timeout=timeout)
    except RayTaskError as exc:
        raise exc.as_instanceof_cause() from None
