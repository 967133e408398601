"""Worker processes that host hospitals, and the hospitals' handles on them (the Ray edge).

A hospital is a plain `HospitalClient`; a `HospitalHost` is the Ray actor (one worker process)
that holds it. On a cluster, and whenever hospitals have a CPU each, every hospital has a host
of its own. On a local Ray where hospitals outnumber the CPUs, hospitals share hosts, one per
CPU, as Flower's simulation shares its actors among clients: each process pays for Python,
torch and torchvision once, and the hospitals it holds train one after another on its CPU
(they would take turns on the CPUs anyway). `runtime.hospitals_per_process` sets it.

A host builds a hospital the first time a call names it, from the hospital's `HospitalSpec`,
which travels with every call (as an object-store reference, put once). A host that Ray
restarts after a crash has lost its hospitals: the next call builds each again, and the
hospital restores its own last state (optimizer moments, privacy ledger) from its state
directory, as a restarted hospital always has.

Inside `reusing()` (a comparison's arms, cross-validation's folds, the test suite) hosts
outlive a run: at a run's end a host that answers at once, was never restarted and ran no
injected fault drops its hospitals and waits for this driver's next run with the same
resources, so a driver that runs many federations starts its worker processes once. Outside
it, and for a Tune trial's hosts (in the trial's placement group), a run's hosts end with it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray

from fedray.config import ExperimentConfig

if TYPE_CHECKING:
    from fedray.federation.client import HospitalClient


@dataclass(frozen=True)
class HospitalSpec:
    """Everything a host needs to build one hospital of one run."""

    key: str  # the run folder and the hospital's name: unique among a host's hospitals
    name: str
    shard_path: str | None
    config: ExperimentConfig
    state_dir: str
    threads: int


def process_started() -> float | None:
    """When this process started (wall clock), or None where that cannot be read."""
    try:
        import psutil  # Ray ships it

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a start-up figure is never worth a failure
        return None


class HospitalHost:
    """One worker process holding the hospitals it is asked for, by spec."""

    def __init__(self) -> None:
        # imported here, not at the top: a host starts importing torch (and scikit-learn's
        # splitters, for a site's own split) the moment it starts, while the driver, which
        # only plans hosts, imports none of it for them
        from fedray.data import sites  # noqa: F401
        from fedray.federation.client import HospitalClient

        self.client_class = HospitalClient
        self.clients: dict[str, HospitalClient] = {}
        self.started: dict[str, dict[str, float | None]] = {}
        self.process_start = process_started()
        self.runs = 0  # runs whose hospitals this process has held

    def _client(self, spec: HospitalSpec) -> HospitalClient:
        client = self.clients.get(spec.key)
        if client is None:
            begun = time.time()
            client = self.client_class(spec.name, spec.shard_path, spec.config, spec.state_dir,
                                    spec.threads)
            self.clients[spec.key] = client
            self.started[spec.key] = {"process_start": self.process_start, "init_start": begun,
                                      "ready": time.time()}
        return client

    def open(self, spec: HospitalSpec) -> None:
        """Build the hospital now (its shard decoded, its model built), not at its first call."""
        self._client(spec)

    def call(self, spec: HospitalSpec, method: str, *args):
        return getattr(self._client(spec), method)(*args)

    def info(self, spec: HospitalSpec) -> dict:
        """The hospital's own info, and which node and process hold it and when it started."""
        info = self._client(spec).info()
        context = ray.get_runtime_context()
        return {**info, "node_id": context.get_node_id(),
                "placement_group": context.get_placement_group_id(),
                "assigned": context.get_assigned_resources(), "started": self.started[spec.key],
                "reused": self.runs > 0}

    def release(self, keys: list[str]) -> dict:
        """Drop these hospitals (their data and models); whether this process can host
        another run: it was never restarted."""
        for key in keys:
            self.clients.pop(key, None)
            self.started.pop(key, None)
        gc.collect()
        self.runs += 1
        return {"restarted": ray.get_runtime_context().was_current_actor_reconstructed}


class HospitalHandle:
    """One hospital on its host, called as an actor is: `handle.fit.remote(weights, ins)`."""

    def __init__(self, host: ray.actor.ActorHandle, spec: ray.ObjectRef) -> None:
        self.host = host
        self.spec = spec

    def __getattr__(self, method: str) -> _Method:
        if method.startswith("__"):
            raise AttributeError(method)
        return _Method(self, method)


class _Method:
    def __init__(self, handle: HospitalHandle, method: str) -> None:
        self.handle = handle
        self.method = method

    def remote(self, *args) -> ray.ObjectRef:
        h = self.handle
        if self.method == "info":
            return h.host.info.remote(h.spec)
        return h.host.call.remote(h.spec, self.method, *args)


# Hosts left by finished runs of this driver, by what they were started with; see release().
_IDLE: dict[str, list[tuple[ray.actor.ActorHandle, dict]]] = {}
_SCOPES = [0]
# Hosts started for the run this driver is about to launch (`prestart`), taken by its pool.
_PRESTARTED: list[tuple[ray.actor.ActorHandle, dict]] = []


@contextmanager
def reusing() -> Iterator[None]:
    """Inside this block, the runs this driver starts one after another share their hosts
    (a comparison's arms, cross-validation's folds); at its end the idle hosts are killed, so
    no idle process keeps CPUs from what runs next (a Tune sweep, a Serve replica)."""
    _SCOPES[0] += 1
    try:
        yield
    finally:
        _SCOPES[0] -= 1
        if _SCOPES[0] == 0:
            forget_idle()


def reuse_on() -> bool:
    return _SCOPES[0] > 0


def _signature(options: dict) -> str:
    return f"{ray.get_runtime_context().get_job_id()} {sorted(options.items())!r}"


def acquire(wanted: list[dict], take_idle: bool) -> list[ray.actor.ActorHandle]:
    """One host per entry of `wanted` (Ray actor options): one prestarted for it, or an idle
    host of this driver's started with the same options when `take_idle`, else a new one, for
    which idle hosts are killed until its CPUs are free (`make_room`)."""
    taken = []
    for options in wanted:
        signature = _signature(options)
        started = [i for i, (_, o) in enumerate(_PRESTARTED) if _signature(o) == signature]
        idle = _IDLE.get(signature) if take_idle else None
        if started:
            taken.append(_PRESTARTED.pop(started[0])[0])
        else:
            taken.append(idle.pop()[0] if idle else None)
    discard_prestarted()  # started for a plan this run did not keep to
    make_room(sum(o.get("num_cpus") or 0.0 for o, host in zip(wanted, taken) if host is None))
    return [host if host is not None else ray.remote(HospitalHost).options(**options).remote()
            for host, options in zip(taken, wanted)]


def prestart(options: list[dict], take_idle: bool) -> None:
    """Start the processes of the run about to launch (one per entry of `options`), or take
    this driver's idle ones (when `take_idle`), so they start and import while the driver
    still reads its data; the run's pool takes them (`acquire`)."""
    _PRESTARTED.extend(zip(acquire(options, take_idle), options))


def discard_prestarted() -> None:
    """Kill the hosts started for a run that will not launch (its start failed)."""
    while _PRESTARTED:
        ray.kill(_PRESTARTED.pop()[0], no_restart=True)


def make_room(cpus: float) -> None:
    """Kill idle hosts until `cpus` CPUs are free for what starts next (new hosts, Ray
    Train's workers); on a cluster of several nodes, where free CPUs may be on the wrong node,
    every idle host."""
    if not any(_IDLE.values()):
        return
    if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        forget_idle()
        return
    free = ray.available_resources().get("CPU", 0.0)
    for signature in list(_IDLE):
        while _IDLE[signature] and free < cpus - 1e-9:
            host, options = _IDLE[signature].pop()
            ray.kill(host, no_restart=True)
            free += options.get("num_cpus") or 0.0


def release(hosts: list[tuple[ray.actor.ActorHandle, dict, list[str]]], reusable: bool,
            wait_s: float = 5.0) -> None:
    """End a run's use of its hosts (each with its options and its hospitals' keys): one
    that drops its hospitals within `wait_s` and was never restarted goes back to the idle
    hosts when `reusable` (and reuse is on); the others are killed: a straggler still
    training, a host restarted after a crash."""
    keep = [False] * len(hosts)
    if reusable and reuse_on():
        refs = [host.release.remote(keys) for host, _, keys in hosts]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        ready = set(ready)
        for i, ref in enumerate(refs):
            if ref in ready:
                try:
                    keep[i] = not ray.get(ref)["restarted"]
                except Exception:  # noqa: BLE001 - a host that cannot answer is killed below
                    pass
    for (host, options, _), kept in zip(hosts, keep):
        if kept:
            _IDLE.setdefault(_signature(options), []).append((host, options))
        else:
            ray.kill(host, no_restart=True)


def forget_idle() -> None:
    """Kill every idle (and prestarted, not yet taken) host of this driver."""
    for host, _ in [h for hs in _IDLE.values() for h in hs] + _PRESTARTED:
        try:
            ray.kill(host, no_restart=True)
        except Exception:  # noqa: BLE001 - of a Ray that is already gone
            pass
    _IDLE.clear()
    _PRESTARTED.clear()
