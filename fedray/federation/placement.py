"""Where hospitals run: starting Ray, each hospital's resources (CPUs, GPUs, the node of its
site), which hospitals share a worker process, and the actor options of each process.

Light on purpose (Ray and the config only, no torch): a run plans its processes and starts
them (`prestart`) before the driver imports torch and reads its data, so the hospitals' start
and imports overlap the driver's own. runtime.py holds the rest of the Ray edge.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fedray.config import ExperimentConfig, RuntimeConfig


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
    """Resources of one hospital actor and the torch threads that match its CPU share.

    `resources` are the custom Ray resources that pin it to a node (empty: not pinned, the
    actor is spread across the nodes). `bundle` is its bundle of the placement group the run
    is inside (a Ray Tune trial's), None outside one.
    """

    num_cpus: float
    num_gpus: float
    threads: int
    resources: dict[str, float] = field(default_factory=dict)
    bundle: int | None = None

    def demand(self) -> dict[str, float]:
        """Everything the actor asks of one node, as Ray names it."""
        need = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: v for k, v in need.items() if v > 0}

    def options(self, group: PlacementGroup | None = None) -> dict:
        """Ray actor options: pinned actors go where their resources are, the others SPREAD;
        inside a placement group, each goes to its own bundle."""
        if group is not None and self.bundle is not None:
            return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                    "resources": dict(self.resources),
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=self.bundle)}
        if self.resources:
            return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                    "resources": dict(self.resources)}
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "scheduling_strategy": "SPREAD"}


def hospital_placement(runtime: RuntimeConfig, hospitals: int, cluster_cpus: float) -> Placement:
    """Share the CPUs evenly by default, so every hospital trains at once and none waits."""
    cpus = runtime.hospital_num_cpus or max(cluster_cpus / hospitals, 0.01)
    return Placement(num_cpus=cpus, num_gpus=runtime.hospital_num_gpus,
                     threads=max(1, math.floor(cpus)))


# A pinned hospital asks its site for this much of the site's resource, so that several
# hospitals (or a hospital and its restart) can share one site node.
PIN_AMOUNT = 0.001
_RAY_OWN = {"CPU", "GPU", "memory", "object_store_memory"}


def _custom(resources: dict[str, float]) -> dict[str, float]:
    """The custom resources among what a node advertises (not CPU, memory, node:<ip>...)."""
    return {k: v for k, v in resources.items()
            if k not in _RAY_OWN and not k.startswith(("node:", "accelerator_type:"))}


def hospital_resources(runtime: RuntimeConfig, names: list[str]) -> dict[str, dict[str, float]]:
    """The custom resources each hospital's actor requires; {} for a hospital not pinned.

    `pin_hospitals_to_nodes` asks hospital X for X: PIN_AMOUNT; `hospital_resources` sets a
    hospital's requirements explicitly (and wins over the pin).
    """
    unknown = sorted(set(runtime.hospital_resources) - set(names))
    if unknown:
        raise StartupError(f"runtime.hospital_resources names {', '.join(unknown)}, which "
                           f"is not a hospital of this run ({', '.join(names)})")
    required = {name: ({name: PIN_AMOUNT} if runtime.pin_hospitals_to_nodes else {})
                for name in names}
    for name, resources in runtime.hospital_resources.items():
        bad = sorted(k for k in resources if k in _RAY_OWN or k.startswith("node:"))
        if bad:
            raise StartupError(f"runtime.hospital_resources.{name}: {', '.join(bad)} is not a "
                               "custom resource (use runtime.hospital_num_cpus/_gpus)")
        negative = sorted(k for k, v in resources.items() if not v > 0)
        if negative:
            raise StartupError(f"runtime.hospital_resources.{name}: the amount of "
                               f"{', '.join(negative)} must be > 0")
        required[name] = dict(resources)
    return required


def hospital_placements(runtime: RuntimeConfig, names: list[str],
                        nodes: list[dict[str, float]]) -> dict[str, Placement]:
    """Each hospital's placement, from the resources of the cluster's live nodes.

    Unpinned hospitals share the cluster's CPUs evenly (`hospital_placement`). A pinned
    hospital with no `runtime.hospital_num_cpus` shares the CPUs of its site instead: the
    largest node advertising its resources, divided among the hospitals pinned like it.
    """
    required = hospital_resources(runtime, names)
    cpus_per_node = [n["CPU"] for n in nodes if "CPU" in n]
    even = hospital_placement(runtime, len(names),
                              sum(cpus_per_node) if cpus_per_node else float(os.cpu_count() or 1))
    placements = {}
    for name in names:
        need = required[name]
        if not need:
            placements[name] = even
            continue
        cpus = runtime.hospital_num_cpus
        if cpus is None:
            site_cpus = max((n.get("CPU", 0.0) for n in nodes
                             if all(n.get(k, 0.0) >= v for k, v in need.items())), default=0.0)
            sharing = sum(1 for other in names if set(required[other]) == set(need))
            cpus = max(site_cpus / sharing, 0.01) if site_cpus else even.num_cpus
        placements[name] = Placement(num_cpus=cpus, num_gpus=runtime.hospital_num_gpus,
                                     threads=max(1, math.floor(cpus)), resources=need)
    return placements


def host_groups(names: list[str], placements: dict[str, Placement], runtime: RuntimeConfig,
                local: bool) -> list[tuple[Placement, list[str]]]:
    """Which hospitals share a worker process (see fedray.federation.hosts), each group with
    the placement of its process: the sum of its hospitals' CPUs.

    Only hospitals that are neither pinned, nor given GPUs, nor in a placement group share.
    `runtime.hospitals_per_process` sets how many share one process; by default (None) they
    share only on a local Ray where they outnumber the CPUs by a whole factor: 4 hospitals of
    half a CPU each become 2 processes of a CPU each, and take turns on it as they would on
    the machine anyway. Elsewhere every hospital has a process of its own.
    """
    alone = [n for n in names if placements[n].resources or placements[n].num_gpus
             or placements[n].bundle is not None]
    shared = [n for n in names if n not in alone]
    per = runtime.hospitals_per_process
    if per is None:
        per = 1
        cpus = sum(placements[n].num_cpus for n in shared)
        processes = max(1, math.floor(cpus + 1e-9))
        if local and shared and processes < len(shared) and len(shared) % processes == 0:
            per = len(shared) // processes
    groups = [(placements[n], [n]) for n in alone]
    for i in range(0, len(shared), per):
        members = shared[i:i + per]
        cpus = sum(placements[n].num_cpus for n in members)
        threads = max(1, math.floor(cpus + 1e-9))
        groups.append((Placement(num_cpus=cpus, num_gpus=0.0, threads=threads), members))
    return groups


def keeps_hosts(config: ExperimentConfig, group: PlacementGroup | None) -> bool:
    """Whether a run may hand its hosts to the next run: not inside a Tune trial's placement
    group (its hosts live there), and no injected fault (one may leave a host hung)."""
    return group is None and not config.runtime.fault_injection


def bundle_placements(names: list[str], bundles: list[dict[str, float]]) -> dict[str, Placement]:
    """Inside a trial's placement group hospital i takes bundle i + 1 whole; bundle 0 is the
    coordinator's (fedray.experiments.tune.trial_resources lays them out)."""
    if len(bundles) != len(names) + 1:
        raise StartupError(
            f"this run is inside a placement group of {len(bundles)} bundles, but it needs "
            f"{len(names) + 1}: the coordinator's, then one per hospital "
            "(see fedray.experiments.tune.trial_resources)")
    return {name: Placement(num_cpus=b.get("CPU", 0.0), num_gpus=b.get("GPU", 0.0),
                            threads=max(1, math.floor(b.get("CPU", 0.0))),
                            resources=_custom(b), bundle=i + 1)
            for i, (name, b) in enumerate(zip(names, bundles[1:]))}


def format_resources(resources: dict[str, float]) -> str:
    """`{CPU: 2, GPU: 0.5}`: resources as the error messages print them."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def unplaceable(demands: dict[str, dict[str, float]],
                nodes: list[dict[str, float]]) -> dict[str, str]:
    """Hospitals no live node could ever host, each with the reason (empty: all fit).

    `demands` is what each hospital's actor asks of one node (Placement.demand()), `nodes`
    the total resources of each live node. Pure, so it is tested without Ray.
    """
    advertised = sorted({k for n in nodes for k in _custom(n)})
    offered = ", ".join(advertised) if advertised else "none"
    problems = {}
    for name, demand in sorted(demands.items()):
        if any(all(n.get(k, 0.0) >= v for k, v in demand.items()) for n in nodes):
            continue
        missing = sorted(k for k in _custom(demand) if not any(k in n for n in nodes))
        if missing:
            problems[name] = (
                f"hospital {name} requires the custom resource {', '.join(missing)}, which no "
                f"node of the cluster advertises (custom resources advertised: {offered}); "
                "start the hospital's node with --resources '{\"" + missing[0] + "\": 1}' "
                "or fix runtime.hospital_resources / pin_hospitals_to_nodes")
            continue
        custom = _custom(demand)
        sites = [n for n in nodes if all(n.get(k, 0.0) >= v for k, v in custom.items())]
        if not sites:
            problems[name] = (f"hospital {name} requires {format_resources(custom)} on one "
                              "node, but no single node advertises all of it (custom resources "
                              f"advertised: {offered})")
            continue
        largest = max(sites, key=lambda n: (n.get("CPU", 0.0), n.get("GPU", 0.0)))
        have = {k: largest.get(k, 0.0) for k in demand}
        problems[name] = (f"hospital {name} asks one node for {format_resources(demand)}, but "
                          f"the largest node that could host it has {format_resources(have)}; "
                          "lower runtime.hospital_num_cpus / hospital_num_gpus")
    return problems


def live_nodes() -> list[dict[str, float]]:
    """Total resources of each live node of the connected cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


@dataclass
class HostPlan:
    """A run's hospitals and the processes that will hold them."""

    names: list[str]
    placements: dict[str, Placement]
    groups: list[tuple[Placement, list[str]]]  # each process's placement and hospitals
    options: list[dict]  # each process's Ray actor options
    reusable: bool  # whether the processes may serve this driver's next run
    group: PlacementGroup | None

    @property
    def takes_idle(self) -> bool:
        """Whether idle processes of this driver's earlier runs may serve this run: any run
        outside a Tune trial's placement group, one with injected faults too (it kills them
        after, as it does not keep them)."""
        return self.group is None


def hospital_names(config: ExperimentConfig, shard_names: list[str] | None = None) -> list[str]:
    """The run's hospitals: its sites, its shards' hospitals, or the names a pooled source's
    simulated sites get."""
    from fedray.data import partition  # numpy only at import

    if config.data.source == "sites":
        return sorted(config.data.sites)
    if shard_names is not None:
        return sorted(shard_names)
    return partition.hospital_names(config.federation.hospitals)


def plan_hosts(config: ExperimentConfig, names: list[str]) -> HostPlan:
    """Each hospital's placement, which share a process, and each process's actor options;
    a StartupError names hospitals no node of the cluster could host."""
    rt = config.runtime
    group = get_current_placement_group()
    if group is not None:  # a Ray Tune trial: its placement group is already reserved
        placements = bundle_placements(names, group.bundle_specs)
    else:
        nodes = live_nodes()
        placements = hospital_placements(rt, names, nodes)
        problems = unplaceable({n: p.demand() for n, p in placements.items()}, nodes)
        if problems:
            raise StartupError("hospitals that no node of the cluster can host:\n  "
                               + "\n  ".join(problems.values()))
    local = group is None and not (rt.address or os.environ.get("RAY_ADDRESS"))
    groups = host_groups(names, placements, rt, local=local)
    options = [{"max_restarts": rt.max_restarts, "max_task_retries": 0,
                **placement.options(group)} for placement, _ in groups]
    return HostPlan(names, placements, groups, options, keeps_hosts(config, group), group)
