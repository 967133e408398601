"""The Kubernetes deployment (k8s/): KubeRay v1.7.0 schemas, the Serve config, and resources
that agree with each other, with the image and with the configs they name; and nothing open on
a cluster (token auth, NetworkPolicies, restricted non-root pods, bounded disk). No cluster
needed.

The overlays are rendered here in Python (the part of kustomize they use: resources and JSON
6902 patches); where kubectl is installed, its kustomize must render the same objects.
"""

from __future__ import annotations

import ast
import copy
import math
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
OVERLAYS = ("cpu", "gpu")
GPU = "nvidia.com/gpu"
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}  # no enum in the CRD
OBJECT_META = {"name", "namespace", "labels", "annotations"}

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc]


# --- the part of kustomize that the overlays use -------------------------------------------

def render(directory: Path) -> list[dict]:
    """What `kubectl kustomize DIRECTORY` prints, for resources and JSON 6902 patches."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, (f"{directory}/kustomization.yaml uses {sorted(unsupported)}, "
                             "which tests/test_k8s.py's renderer does not implement")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else load_docs(path)
    for patch in spec.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), f"{patch['path']}: only JSON 6902 patches are implemented"
        targets = [doc for doc in docs if _selected(patch["target"], doc)]
        assert len(targets) == 1, f"{patch['path']} selects {len(targets)} objects, not one"
        apply_json_patch(targets[0], ops, patch["path"])
    return docs


def _selected(target: dict, doc: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": doc["kind"],
            "name": doc["metadata"]["name"]}
    return all(have[key] == value for key, value in target.items())


def apply_json_patch(doc: dict, ops: list[dict], origin: str) -> None:
    """RFC 6902 add / remove / replace / test, in place."""
    for op in ops:
        *parents, last = [part.replace("~1", "/").replace("~0", "~")
                          for part in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        where = f"{origin}: {op['op']} {op['path']}"
        if op["op"] in ("test", "replace", "remove"):
            assert (key < len(node)) if isinstance(node, list) else (key in node), \
                f"{where}: no such path"
        if op["op"] == "test":
            assert node[key] == op["value"], f"{where}: is {node[key]!r}, not {op['value']!r}"
        elif op["op"] == "replace":
            node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[key]
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(key, copy.deepcopy(op["value"]))
        elif op["op"] == "add":
            node[key] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"{where}: op not implemented by tests/test_k8s.py")


# --- KubeRay's schemas, strict -------------------------------------------------------------

def strict(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema that, like the API server's strict field
    validation, rejects unknown fields (the CRDs leave additionalProperties unset)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    return schema


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -2**31 <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -2**63 <= value < 2**63


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay v1.7.0 CRDs not found at {CRDS}: check the repository out "
                    "beside shared/")
    out = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRDS / name).read_text(), Loader=Loader)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]),
                                               format_checker=FORMATS)
    return out


def schema_errors(doc: dict, validators: dict) -> list[str]:
    """Every problem with one object, each as 'KIND/NAME /json/path: message'."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    errors = [f"{where} /{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validators[doc["kind"]].iter_errors(doc)]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"{where}: apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    extra = set(doc.get("metadata", {})) - OBJECT_META
    if extra:
        errors.append(f"{where} /metadata: unexpected {sorted(extra)}")
    return errors


# --- walking the manifests -----------------------------------------------------------------

def ray_docs(docs: list[dict]) -> list[dict]:
    return [doc for doc in docs if doc["kind"] in CRD_FILES]


def base_docs() -> list[dict]:
    return render(K8S / "base")


def cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def find(node: object, key: str) -> list:
    """Every value stored under `key` anywhere inside node."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + find(list(node.values()), key)
    if isinstance(node, list):
        return [x for v in node for x in find(v, key)]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for group in find(doc, "containers") + find(doc, "initContainers") for c in group]


def pod_specs(doc: dict) -> list[dict]:
    """The Ray pods' specs (head and worker groups) and the RayJob submitter's."""
    return [t["spec"] for t in find(doc, "template") + find(doc, "submitterPodTemplate")]


def quantity(value: str | int | float) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].replace(".", "").isdigit():
            return float(text[: -len(unit)]) * factor
    return float(text)


def ray_capacity(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) a Ray pod advertises: rayStartParams first, else its container's limits
    (KubeRay rounds CPUs up)."""
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    params = group.get("rayStartParams", {})
    cpus = float(params.get("num-cpus", math.ceil(quantity(limits.get("cpu", 0)))))
    gpus = float(params.get("num-gpus", quantity(limits.get(GPU, 0))))
    return cpus, gpus


def unplaced(demands: list[tuple[float, float]], nodes: list[tuple[float, float]]) -> list:
    """First-fit decreasing of (CPU, GPU) demands onto nodes: the demands that do not fit."""
    free = [list(node) for node in nodes]
    left = []
    for cpu, gpu in sorted(demands, key=lambda d: (d[1], d[0]), reverse=True):
        node = next((n for n in free if n[0] >= cpu - 1e-9 and n[1] >= gpu - 1e-9), None)
        if node is None:
            left.append((cpu, gpu))
        else:
            node[0] -= cpu
            node[1] -= gpu
    return left


def cluster_nodes(doc: dict, replicas: str) -> list[tuple[float, float]]:
    spec = cluster_spec(doc)
    nodes = [ray_capacity(spec["headGroupSpec"])]
    for group in spec.get("workerGroupSpecs", []):
        nodes += [ray_capacity(group)] * group[replicas]
    return nodes


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def serve_app(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def deployment(app: dict, name: str) -> dict:
    (found,) = [d for d in app["deployments"] if d["name"] == name]
    return found


def pins() -> dict[str, str]:
    """pyproject.toml's exact pins, by distribution name."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m[1].lower(): m[2] for d in deps
            if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([\w.]+)", d.strip()))}


def config_argument(entrypoint: str) -> tuple[list[str], Path, list[str]]:
    words = shlex.split(entrypoint)
    assert "--config" in words, f"{entrypoint!r} names no --config"
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    return words, Path(words[words.index("--config") + 1]), overrides


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


# --- schemas -------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["base", *OVERLAYS])
def test_manifests_validate_against_kuberay_crds(source, validators):
    docs = base_docs() if source == "base" else render(K8S / "overlays" / source)
    kinds = {doc["kind"] for doc in ray_docs(docs)}
    assert kinds == set(CRD_FILES), f"{source}: missing {set(CRD_FILES) - kinds}"
    errors = [e for doc in ray_docs(docs) for e in schema_errors(doc, validators)]
    assert not errors, "\n".join(errors)


MISTAKES = [  # (file, path to a mapping, key, new key or None, new value, where and what)
    ("rayservice.yaml", "spec/rayClusterConfig/workerGroupSpecs/0/template/spec/containers/0",
     "resources", "resource", None,
     ("/spec/rayClusterConfig/workerGroupSpecs/0/template/spec/containers/0", "'resource'")),
    ("rayjob-train.yaml", "spec", "shutdownAfterJobFinishes", "shutdownAfterJobFinish", None,
     ("/spec:", "'shutdownAfterJobFinish'")),
    ("raycluster.yaml", "spec/headGroupSpec/rayStartParams", "num-cpus", None, 0,
     ("/spec/headGroupSpec/rayStartParams/num-cpus", "not of type 'string'")),
    ("raycluster.yaml", "spec/workerGroupSpecs/0/template/spec/containers/0/resources/limits",
     "memory", None, "32 Gi",
     ("/spec/workerGroupSpecs/0/template/spec/containers/0/resources/limits/memory", "'32 Gi'")),
]


@pytest.mark.parametrize("name, path, key, new_key, new_value, expected", MISTAKES,
                         ids=[m[3] or f"{m[2]}={m[4]!r}" for m in MISTAKES])
def test_a_mistake_is_rejected_with_its_path(name, path, key, new_key, new_value, expected,
                                             validators):
    doc = copy.deepcopy(ray_docs(load_docs(K8S / "base" / name))[0])
    node = doc
    for part in path.split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    if new_key:
        node[new_key] = node.pop(key)
    else:
        node[key] = new_value
    errors = schema_errors(doc, validators)
    assert any(expected[0] in e and expected[1] in e for e in errors), errors


# --- the rendered overlays -----------------------------------------------------------------

@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("directory", ["overlays/cpu", "overlays/gpu", "."])
def test_kustomize_renders_what_the_tests_check(directory):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / directory)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    theirs = sorted(yaml.safe_load_all(out.stdout), key=key)
    assert theirs == sorted(render(K8S / directory), key=key)


def test_k8s_root_is_the_gpu_overlay():
    assert render(K8S) == render(K8S / "overlays" / "gpu")


def test_cpu_overlay_asks_for_no_gpu():
    docs = render(K8S / "overlays" / "cpu")
    text = yaml.safe_dump_all(docs)
    assert GPU not in text, "the CPU overlay still requests or tolerates GPUs"
    for doc in ray_docs(docs):
        assert all(g["groupName"] != "gpu" for g in cluster_spec(doc).get("workerGroupSpecs", []))


# --- resources -----------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["base", *OVERLAYS])
def test_requests_equal_limits(source):
    docs = base_docs() if source == "base" else render(K8S / "overlays" / source)
    docs += load_docs(K8S / "storage-shell.yaml")
    for doc in docs:
        resources = [c["resources"] for c in containers(doc)]
        resources += [a["resources"] for a in find(doc, "autoscalerOptions")]
        for r in resources:
            assert r.get("requests") == r.get("limits"), f"{doc['metadata']['name']}: {r}"
            assert {"cpu", "memory"} <= set(r["limits"]), f"{doc['metadata']['name']}: {r}"


def test_gpu_pods_tolerate_the_gpu_taint():
    for doc in ray_docs(render(K8S / "overlays" / "gpu")):
        for spec in pod_specs(doc):
            if any(GPU in c["resources"].get("limits", {}) for c in spec["containers"]):
                assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), \
                    f"{doc['metadata']['name']}: a GPU pod without the {GPU} toleration"


@pytest.mark.parametrize("source", ["base", *OVERLAYS])
def test_heads_do_no_work_and_workers_scale_within_bounds(source):
    docs = base_docs() if source == "base" else render(K8S / "overlays" / source)
    for doc in ray_docs(docs):
        spec = cluster_spec(doc)
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["enableInTreeAutoscaling"] is True
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], \
                f"{doc['metadata']['name']}/{group['groupName']}"


def test_serve_gpus_match_the_worker_group(overlay):
    name, docs = overlay
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    app = serve_app(serve_config(service))
    model_gpus = deployment(app, "Model")["ray_actor_options"].get("num_gpus", 0)
    worker_gpus = [ray_capacity(g)[1] for g in cluster_spec(service)["workerGroupSpecs"]]
    assert (model_gpus > 0) == any(worker_gpus) == (name == "gpu")
    assert app["args"]["device"] == ("cuda" if model_gpus > 0 else "cpu")
    for d in app["deployments"]:
        if d["name"] != "Model":
            assert d.get("ray_actor_options", {}).get("num_gpus", 0) == 0


def test_service_places_its_replicas(overlay):
    _, docs = overlay
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    app = serve_app(serve_config(service))

    def demand(d: dict, bound: str) -> list[tuple[float, float]]:
        options = d.get("ray_actor_options", {})
        count = d["autoscaling_config"][bound] if "autoscaling_config" in d else d["num_replicas"]
        return [(options.get("num_cpus", 1), options.get("num_gpus", 0))] * count

    for replicas, bound in (("replicas", "min_replicas"), ("maxReplicas", "max_replicas")):
        demands = [x for d in app["deployments"] for x in demand(d, bound)]
        left = unplaced(demands, cluster_nodes(service, replicas))
        assert not left, f"{replicas} workers cannot hold the Serve replicas {bound}: {left} left"


def test_train_job_places_every_hospital(overlay):
    """The job's cluster, as it starts, holds every hospital actor of the config it runs
    (sized by fedray.federation.runtime as the run will size them) and the coordinator."""
    from fedray.config import load_config
    from fedray.federation.runtime import hospital_placement

    name, docs = overlay
    (job,) = [d for d in docs if d["kind"] == "RayJob" and d["metadata"]["name"] == "fedray-train"]
    _, path, overrides = config_argument(job["spec"]["entrypoint"])
    config = load_config(ROOT / path, overrides)
    runtime, hospitals = config.runtime, config.federation.hospitals
    nodes = cluster_nodes(job, "replicas")
    each = hospital_placement(runtime, hospitals, sum(cpus for cpus, _ in nodes))
    coordinator = (runtime.coordinator_num_cpus, runtime.coordinator_num_gpus)
    demands = [(each.num_cpus, each.num_gpus)] * hospitals + [coordinator]
    left = unplaced(demands, nodes)
    assert not left, f"{name}: {path} asks for {demands}; the nodes {nodes} cannot hold {left}"


def test_tune_job_trial_fits_one_worker_pod_and_keeps_its_sweep(overlay):
    """One trial of the sweep the job runs fits one worker pod whole (the autoscaler adds pods
    of that shape as trials wait: fedray.experiments.tune refuses only a bundle no node shape holds), and
    the sweep folder is written on the runs volume, which every pod mounts."""
    from fedray.experiments import tune

    name, docs = overlay
    (job,) = [d for d in docs if d["kind"] == "RayJob" and d["metadata"]["name"] == "fedray-tune"]
    words, path, overrides = config_argument(job["spec"]["entrypoint"])
    sweep = tune.load_sweep(ROOT / path, overrides)
    bundles = tune.trial_resources(sweep.base)
    for group in cluster_spec(job)["workerGroupSpecs"]:
        cpus, gpus = ray_capacity(group)
        pod = {"CPU": cpus, "GPU": gpus}
        assert tune.unplaceable_trial(bundles, [pod]) is None, f"{name}: {group['groupName']}"
        assert tune.trial_outgrows_cluster(bundles, [pod]) is None, \
            f"{name}: one trial of {path} ({bundles}) does not fit a {group['groupName']} pod {pod}"
    assert "--output-dir" in words, f"{name}: the sweep would go to {sweep.config.storage}"
    output = Path(words[words.index("--output-dir") + 1])
    for spec in (t["spec"] for t in find(cluster_spec(job), "template")):  # the Ray pods
        runs = [m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])
                if m["name"] == "runs" and not m.get("readOnly")]
        assert any(output.is_relative_to(m) for m in runs), f"{name}: {output} not on {runs}"


# --- the Serve application -----------------------------------------------------------------

def _unknown_keys(model, raw: dict, path: str) -> list[str]:
    """ServeDeploySchema ignores keys it does not know (forward compatibility); a typo there
    would silently fall back to a default, so name them."""
    from pydantic import BaseModel

    by_name = {f.alias or n: n for n, f in type(model).model_fields.items()} | \
        {n: n for n in type(model).model_fields}
    found = []
    for key, value in raw.items():
        if key not in by_name:
            found.append(f"{path}.{key}")
            continue
        child = getattr(model, by_name[key])
        if isinstance(child, BaseModel) and isinstance(value, dict):
            found += _unknown_keys(child, value, f"{path}.{key}")
        elif isinstance(child, list) and isinstance(value, list):
            found += [e for i, (c, v) in enumerate(zip(child, value))
                      if isinstance(c, BaseModel) and isinstance(v, dict)
                      for e in _unknown_keys(c, v, f"{path}.{key}[{i}]")]
    return found


def serve_schema_problems(raw: dict) -> list[str]:
    """Ray's ServeDeploySchema errors, then the keys it would ignore."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        return [str(exc)]
    unknown = _unknown_keys(schema, raw, "serveConfigV2")
    for i, app in enumerate(raw["applications"]):
        for j, d in enumerate(app.get("deployments", [])):
            if isinstance(d.get("autoscaling_config"), dict):
                path = f"serveConfigV2.applications[{i}].deployments[{j}].autoscaling_config"
                try:
                    scaling = AutoscalingConfig.model_validate(d["autoscaling_config"])
                except ValidationError as exc:
                    return [f"{path}: {exc}"]
                unknown += _unknown_keys(scaling, d["autoscaling_config"], path)
    return [f"{key}: not a field Ray Serve knows" for key in unknown]


def test_serve_config_is_a_serve_deploy_schema(overlay):
    _, docs = overlay
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    raw = serve_config(service)
    problems = serve_schema_problems(raw)
    assert not problems, "\n".join(problems)
    app = serve_app(raw)
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "Model"}
    model = deployment(app, "Model")
    assert model["user_config"]["package"] == app["args"]["package"]
    assert app["args"]["max_batch_size"] <= model["max_ongoing_requests"], \
        "a Model replica never sees enough requests at once to fill a batch"
    assert service["spec"]["upgradeStrategy"]["type"] in UPGRADE_TYPES


@pytest.mark.parametrize("key, typo, where", [
    ("max_queued_requests", "max_queue_requests", "deployments[1].max_queue_requests"),
    ("min_replicas", "min_replica", "deployments[1].autoscaling_config.min_replica"),
    ("num_gpus", "num_gpu", "deployments[1].ray_actor_options.num_gpu"),
])
def test_a_serve_typo_is_named(key, typo, where):
    (service,) = [d for d in base_docs() if d["kind"] == "RayService"]
    raw = serve_config(service)
    model = deployment(serve_app(raw), "Model")
    assert raw["applications"][0]["deployments"][1] is model
    for node in (model, model["autoscaling_config"], model["ray_actor_options"]):
        if key in node:
            node[typo] = node.pop(key)
    problems = serve_schema_problems(raw)
    assert any(where in p for p in problems), problems


def test_cpu_serve_config_is_the_gpu_one_on_cpu():
    configs = {name: serve_config(next(d for d in render(K8S / "overlays" / name)
                                       if d["kind"] == "RayService")) for name in OVERLAYS}
    expected = copy.deepcopy(configs["gpu"])
    app = serve_app(expected)
    app["args"]["device"] = "cpu"
    deployment(app, "Model")["ray_actor_options"]["num_gpus"] = 0
    assert configs["cpu"] == expected


def _module_path(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def build_app_definition(import_path: str) -> tuple[Path, ast.FunctionDef]:
    """The `def` an import path names, followed through `from X import name` re-exports by
    parsing only: serve/app.py is not imported (that would start pulling in Ray and torch)."""
    module, _, attribute = import_path.partition(":")
    if _module_path(module) is None:
        pytest.skip(f"{module.replace('.', '/')}.py is not written yet")
    for _ in range(8):
        path = _module_path(module)
        assert path is not None, f"{import_path}: no module {module} in the repository"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == attribute:
                return path, node
        imported = [(node.module, alias.name) for node in tree.body
                    if isinstance(node, ast.ImportFrom) and node.level == 0
                    for alias in node.names if (alias.asname or alias.name) == attribute]
        assert imported, f"{path.relative_to(ROOT)} neither defines nor imports {attribute}"
        module, attribute = imported[0]
    raise AssertionError(f"{import_path}: re-exported too many times")


def test_serve_import_path_resolves_to_build_app():
    (service,) = [d for d in base_docs() if d["kind"] == "RayService"]
    import_path = serve_app(serve_config(service))["import_path"]
    assert import_path == "serve.app:build_app"
    _, function = build_app_definition(import_path)
    assert function.name == "build_app"
    assert len(function.args.args) == 1, "build_app takes one argument: the application's args"


def test_serve_args_are_fields_of_the_app():
    """Every key of args and of the Model's user_config is a field that the application's
    pydantic models declare (they forbid unknown keys, so a stray one fails the deploy)."""
    (service,) = [d for d in base_docs() if d["kind"] == "RayService"]
    app = serve_app(serve_config(service))
    path, _ = build_app_definition(app["import_path"])
    fields = {node.target.id for source in path.parent.glob("*.py")
              for node in ast.walk(ast.parse(source.read_text()))
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    keys = set(app["args"]) | set(deployment(app, "Model")["user_config"])
    assert keys <= fields, \
        f"{path.parent.relative_to(ROOT)} declares no field {sorted(keys - fields)}"


def test_service_runs_the_app_of_serve_config_yaml():
    """The RayService and serve/config.yaml (local `serve run`) deploy the same application:
    the cluster's copy differs in values, never in shape."""
    path = ROOT / "serve" / "config.yaml"
    if not path.is_file():
        pytest.skip("serve/config.yaml is not written yet")
    local = serve_app(yaml.safe_load(path.read_text()))
    (service,) = [d for d in base_docs() if d["kind"] == "RayService"]
    cluster = serve_app(serve_config(service))
    for key in ("name", "route_prefix", "import_path"):
        assert cluster[key] == local[key], key
    assert set(cluster["args"]) == set(local["args"])
    assert [d["name"] for d in cluster["deployments"]] == [d["name"] for d in local["deployments"]]


def test_service_pods_run_serves_fast_path_and_haproxy_ingress(overlay):
    """Every RayService pod starts Ray with Serve's throughput-optimised mode and its HAProxy
    ingress (which listens on every interface for its stats and metrics: the NetworkPolicies
    keep those ports to the cluster's own pods: test_locked_down, network_problems)."""
    _, docs = overlay
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    for container in (c for spec in pod_specs(service) for c in spec["containers"]):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1", container["name"]
        assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", container["name"]


def test_service_fails_closed_without_its_token(overlay):
    """The service listens on 0.0.0.0: /v1 needs the token, which comes from a required Secret
    (no Secret, no pods), and the app refuses to start with an empty one (no opt-out)."""
    name, docs = overlay
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    args = serve_app(serve_config(service))["args"]
    variable = args["auth_token_env"]
    assert variable and args.get("allow_unauthenticated") is False, name
    for container in containers(service):
        (env,) = [e for e in container.get("env", []) if e["name"] == variable]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"], container["name"]
        assert ref.get("optional", False) is False, f"{name}: {container['name']}'s Secret " \
            "is optional: a missing Secret would start the service without its token"


# --- jobs, volumes, image ------------------------------------------------------------------

def test_job_entrypoints_name_existing_configs(overlay):
    from fedray.cli import build_parser

    _, docs = overlay
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} == {"fedray-train", "fedray-tune"}
    for job in jobs:
        words, path, _ = config_argument(job["spec"]["entrypoint"])
        assert words[0] == "fedray"
        assert path.parts[0] == "configs" and (ROOT / path).is_file(), f"{path} does not exist"
        try:
            build_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"fedray's CLI rejects the entrypoint {job['spec']['entrypoint']!r}")


def test_jobs_clean_up_after_themselves():
    for job in (d for d in base_docs() if d["kind"] == "RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        assert "backoffLimit" in spec


def test_services_kuberay_creates_have_distinct_names(overlay):
    """KubeRay names a head Service after its owner (RayJob and RayService: NAME-head-svc, the
    RayService's Serve one NAME-serve-svc; a RayCluster's may be renamed): a RayService and a
    RayCluster both called fedray would fight over fedray-head-svc."""
    name, docs = overlay
    services = []
    for doc in ray_docs(docs):
        head = cluster_spec(doc)["headGroupSpec"].get("headService", {}).get("metadata", {})
        own = head.get("name") if doc["kind"] == "RayCluster" else None
        services.append(own or f"{doc['metadata']['name']}-head-svc")
        if doc["kind"] == "RayService":
            services.append(f"{doc['metadata']['name']}-serve-svc")
    assert len(services) == len(set(services)), f"{name}: {sorted(services)}"


def test_hospital_data_is_read_only_and_claims_exist():
    docs = base_docs()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in ray_docs(docs):
        for spec in pod_specs(doc):
            volumes = {v["name"]: v["persistentVolumeClaim"] for v in spec.get("volumes", [])}
            assert set(c["claimName"] for c in volumes.values()) <= claims
            for mount in (m for c in spec["containers"] for m in c.get("volumeMounts", [])):
                claim = volumes[mount["name"]]
                if claim["claimName"] in READ_ONLY_CLAIMS or doc["kind"] == "RayService" or \
                        (site_claim(claim["claimName"]) or ("", ""))[1] == "data":
                    assert mount.get("readOnly") and claim.get("readOnly"), \
                        f"{doc['metadata']['name']} mounts {mount['mountPath']} writable"
    for job in (d for d in docs if d["kind"] == "RayJob"):  # images: pooled, or at the sites
        mounts = {m["mountPath"] for c in containers(job) for m in c.get("volumeMounts", [])}
        assert "/app/runs" in mounts and ("/app/data" in mounts or SITE_DATA in mounts), \
            job["metadata"]["name"]


def test_one_pinned_image_everywhere():
    dockerfile = (K8S / "Dockerfile").read_text()
    (built,) = re.findall(r"docker build .*-t (\S+)", dockerfile)
    docs = base_docs() + load_docs(K8S / "storage-shell.yaml")
    images = {c["image"] for doc in docs for c in containers(doc)}
    assert images == {built}, f"manifests use {images}, the Dockerfile builds {built}"
    name, _, tag = built.rpartition(":")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert name and tag == version, f"image tag {tag!r} is not fedray's version {version}"
    assert f'org.opencontainers.image.version="{version}"' in dockerfile
    for doc in ray_docs(docs):
        assert cluster_spec(doc)["rayVersion"] == pins()["ray"]


def test_dockerfile_matches_pyproject():
    dockerfile = (K8S / "Dockerfile").read_text()
    versions = pins()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert base == f"rayproject/ray:{versions['ray']}-py311-gpu"
    for package in ("torch", "torchvision"):
        assert re.findall(rf"\b{package}==([\w.]+)", dockerfile) == [versions[package]], package
    assert re.search(r"^WORKDIR /app$", dockerfile, flags=re.M)
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, flags=re.M):
        for item in map(ROOT.joinpath, source.split()):
            assert item.is_file() or any(p.is_file() for p in item.rglob("*")), \
                f"the Dockerfile copies {item.relative_to(ROOT)}, which holds no file"


# --- sites: each hospital's images stay on its own site's pod ------------------------------

SITE_DATA, SITE_STATE = "/app/site", "/app/site-state"
READ_ONLY_CLAIMS = {"fedray-hospital-data", "fedray-weights"}  # shared, never written by a job
HEAD_SITE_CLAIMS = {"fedray-runs", "fedray-weights"}  # all a site cluster's head may mount
SITE_CLAIM = re.compile(r"fedray-site-([a-z0-9]+)-(data|state)")
SITE_GROUP = re.compile(r"site-([a-z0-9]+)")
SHELLS = ("storage-shell.yaml", "site-shell.yaml")


def site_claim(name: str) -> tuple[str, str] | None:
    """(site, 'data' or 'state') of a site's claim; None for a shared one."""
    match = SITE_CLAIM.fullmatch(name)
    return (match[1], match[2]) if match else None


def mounted_claims(spec: dict) -> dict[str, list[tuple[str, bool]]]:
    """Each claim a pod spec mounts: its (mountPath, read-only in both mount and claim)."""
    volumes = {v["name"]: v["persistentVolumeClaim"] for v in spec.get("volumes", [])
               if "persistentVolumeClaim" in v}
    out: dict[str, list[tuple[str, bool]]] = {}
    for c in spec["containers"] + spec.get("initContainers", []):
        for m in c.get("volumeMounts", []):
            if m["name"] in volumes:
                claim = volumes[m["name"]]
                out.setdefault(claim["claimName"], []).append(
                    (m["mountPath"], bool(m.get("readOnly")) and bool(claim.get("readOnly"))))
    return out


def advertised(group: dict) -> dict[str, int]:
    """The custom Ray resources a group's pods advertise, read as Ray's KubeRay autoscaler
    reads them (rayStartParams.resources in KubeRay's '"{\\"X\\": 1}"' format, or the
    group's own resources field); a value in any other format raises."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    return _get_custom_resources(group.get("resources", {}), group.get("rayStartParams", {}),
                                 group.get("groupName", "head"))


def site_groups(doc: dict) -> dict[str, dict]:
    """The worker groups named site-X of a Ray object, by site X."""
    return {m[1]: g for g in cluster_spec(doc).get("workerGroupSpecs", [])
            if (m := SITE_GROUP.fullmatch(g["groupName"]))}


def site_problems(docs: list[dict]) -> list[str]:
    """No pod mounts two sites' volumes; a site's volumes are mounted only by its worker
    group site-X (data read-only at /app/site, state writable at /app/site-state), which
    advertises exactly its hospital's resource hospital_X through rayStartParams; heads mount
    no site volume, and a site cluster's head nothing but the runs volume and the weights."""
    problems = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Pod":
            pods = [("pod", None, doc["spec"])]
        elif doc["kind"] in CRD_FILES:
            spec = cluster_spec(doc)
            pods = [("head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"])]
            pods += [(g["groupName"], g, g["template"]["spec"])
                     for g in spec.get("workerGroupSpecs", [])]
            pods += [("submitter", None, t["spec"]) for t in find(doc, "submitterPodTemplate")]
        else:
            continue
        is_site_cluster = doc["kind"] in CRD_FILES and bool(site_groups(doc))
        for group_name, group, spec in pods:
            where = f"{name} {group_name}"
            claims = mounted_claims(spec)
            sites = sorted({s[0] for c in claims if (s := site_claim(c))})
            if len(sites) > 1:
                problems.append(f"{where}: mounts the volumes of sites {', '.join(sites)}")
            resources: dict[str, int] = {}
            if group is not None:
                try:
                    resources = advertised(group)
                except Exception as exc:  # noqa: BLE001 - Ray's parser raises anything
                    problems.append(f"{where}: rayStartParams.resources "
                                    f"{group['rayStartParams'].get('resources')!r} is not in "
                                    f"KubeRay's format ({type(exc).__name__}: {exc})")
            own = SITE_GROUP.fullmatch(group_name) if group_name not in ("head", "pod") else None
            if group_name == "pod":
                continue
            if own is None:
                if sites:
                    problems.append(f"{where}: mounts site {', '.join(sites)}'s volumes, "
                                    "but it is no site's worker group")
                hospitals = sorted(k for k in resources if k.startswith("hospital_"))
                if hospitals:
                    problems.append(f"{where}: advertises {', '.join(hospitals)}, but it is "
                                    "no site's worker group")
                if group_name == "head" and is_site_cluster and set(claims) - HEAD_SITE_CLAIMS:
                    problems.append(f"{where}: the head of a site cluster mounts "
                                    f"{sorted(set(claims) - HEAD_SITE_CLAIMS)}, not only "
                                    f"{sorted(HEAD_SITE_CLAIMS)}")
                continue
            site = own[1]
            expected = {f"hospital_{site}": 1}
            if resources != expected:
                problems.append(f"{where}: advertises {resources}, not {expected}")
            if "resources" in group:
                problems.append(f"{where}: sets the group's resources field, which overrides "
                                "rayStartParams.resources")
            if set(sites) - {site}:
                problems.append(f"{where}: mounts site {', '.join(sorted(set(sites) - {site}))}'s "
                                "volumes")
            data = claims.get(f"fedray-site-{site}-data", [])
            state = claims.get(f"fedray-site-{site}-state", [])
            if data != [(SITE_DATA, True)]:
                problems.append(f"{where}: mounts fedray-site-{site}-data as {data}, not "
                                f"read-only at {SITE_DATA}")
            if [path for path, read_only in state if not read_only] != [SITE_STATE] or \
                    len(state) != 1:
                problems.append(f"{where}: mounts fedray-site-{site}-state as {state}, not "
                                f"writable at {SITE_STATE}")
            shared_writable = [c for c, ms in claims.items()
                               if not site_claim(c) and any(not ro for _, ro in ms)]
            if shared_writable:
                problems.append(f"{where}: a site's pod writes the shared {shared_writable}")
    return problems


def train_site_problems(docs: list[dict]) -> list[str]:
    """The training job runs a site config whose every site has its worker group (found by
    the resource its hospital is pinned to) with the site's folders where that group mounts
    them, the coordinator in the driver, and the run folder on the head's runs volume; each
    hospital fits its own site's node and no other."""
    from fedray.config import load_config
    from fedray.federation.runtime import hospital_placements, unplaceable

    (job,) = [d for d in docs if d["kind"] == "RayJob" and d["metadata"]["name"] == "fedray-train"]
    words, path, overrides = config_argument(job["spec"]["entrypoint"])
    config = load_config(ROOT / path, overrides)
    if config.data.source != "sites":
        return [f"{path}: data.source is {config.data.source!r}, not 'sites'"]
    problems = []
    if not config.runtime.pin_hospitals_to_nodes:
        problems.append(f"{path}: runtime.pin_hospitals_to_nodes is false")
    if config.runtime.coordinator != "driver":
        problems.append(f"{path}: runtime.coordinator is {config.runtime.coordinator!r}, "
                        "not 'driver' (an actor would run on a site's pod)")
    spec = cluster_spec(job)
    head = spec["headGroupSpec"]
    runs = [p for c, ms in mounted_claims(head["template"]["spec"]).items() if c == "fedray-runs"
            for p, ro in ms if not ro]
    output = Path(words[words.index("--output-dir") + 1]) if "--output-dir" in words else None
    if output is None or not any(output.is_relative_to(r) for r in runs):
        problems.append(f"fedray-train: --output-dir {output} is not on the head's runs "
                        f"volume {runs}")
    groups = spec.get("workerGroupSpecs", [])
    by_resource = {}
    for group in groups:
        try:
            for key in advertised(group):
                by_resource.setdefault(key, []).append(group)
        except Exception:  # noqa: BLE001 - site_problems names the format
            continue
    for hospital, site in sorted(config.data.sites.items()):
        found = by_resource.get(hospital, [])
        if len(found) != 1:
            problems.append(f"{path}: {len(found)} worker groups advertise {hospital}, not one")
            continue
        claims = mounted_claims(found[0]["template"]["spec"])
        mounts = {c: [p for p, _ in ms] for c, ms in claims.items()}
        for folder, kind in ((site.path, "data"), (site.state_dir, "state")):
            at = [Path(p) for c, ps in mounts.items() if site_claim(c) and site_claim(c)[1] == kind
                  for p in ps]
            if folder is None or not any(Path(folder).is_relative_to(p) for p in at):
                problems.append(f"{path}: {hospital}'s {kind} folder {folder} is not on "
                                f"{found[0]['groupName']}'s site {kind} volume {at}")
    # Ray's view of the cluster as it starts: each node's CPUs, GPUs and custom resources.
    nodes, owners = [], []
    for group in [head] + groups:
        cpus, gpus = ray_capacity(group)
        try:
            custom = advertised(group)
        except Exception:  # noqa: BLE001
            custom = {}
        for _ in range(1 if group is head else group["replicas"]):
            nodes.append({"CPU": cpus, "GPU": gpus, **custom})
            owners.append(group.get("groupName", "head"))
    names = sorted(config.data.sites)
    try:
        placements = hospital_placements(config.runtime, names, nodes)
    except Exception as exc:  # noqa: BLE001
        return problems + [f"{path}: {exc}"]
    demands = {n: p.demand() for n, p in placements.items()}
    problems += [f"fedray-train: {msg}" for msg in unplaceable(demands, nodes).values()]
    for hospital, demand in demands.items():
        hosts = {owners[i] for i, n in enumerate(nodes)
                 if all(n.get(k, 0.0) >= v for k, v in demand.items())}
        expected = {f"site-{hospital.removeprefix('hospital_')}"}
        if hosts and hosts != expected:
            problems.append(f"fedray-train: {hospital} ({demand}) may run on {sorted(hosts)}, "
                            f"not only {sorted(expected)}")
    return problems


def with_shells(docs: list[dict]) -> list[dict]:
    return docs + [d for name in SHELLS for d in load_docs(K8S / name)]


@pytest.mark.parametrize("source", ["base", *OVERLAYS])
def test_each_site_keeps_its_own_volumes(source):
    docs = base_docs() if source == "base" else render(K8S / "overlays" / source)
    problems = site_problems(with_shells(docs))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", ["base", *OVERLAYS])
def test_site_clusters_have_one_worker_group_per_site(source):
    """The training job's and the standalone cluster's workers are the four sites' groups,
    and nothing else: a group without a site would host whatever Ray sends it."""
    docs = base_docs() if source == "base" else render(K8S / "overlays" / source)
    for doc in ray_docs(docs):
        if doc["metadata"]["name"] in ("fedray-train", "fedray") and doc["kind"] != "RayService":
            groups = [g["groupName"] for g in cluster_spec(doc)["workerGroupSpecs"]]
            assert groups == [f"site-{s}" for s in "abcd"], f"{doc['kind']}: {groups}"
            assert all(g["maxReplicas"] == 1 for g in cluster_spec(doc)["workerGroupSpecs"]), \
                f"{doc['kind']}: one pod per site"


def test_site_claims_exist_and_shells_mount_one_site():
    claims = {d["metadata"]["name"] for d in base_docs() if d["kind"] == "PersistentVolumeClaim"}
    for s in "abcd":
        assert {f"fedray-site-{s}-data", f"fedray-site-{s}-state"} <= claims
    for name in SHELLS:
        (pod,) = load_docs(K8S / name)
        used = set(mounted_claims(pod["spec"]))
        assert used <= claims, f"{name} mounts {used - claims}, which storage.yaml lacks"
        assert len({site_claim(c)[0] for c in used if site_claim(c)}) <= 1, name


def test_every_site_of_the_train_config_has_its_worker_group(overlay):
    name, docs = overlay
    problems = train_site_problems(docs)
    assert not problems, f"{name}:\n" + "\n".join(problems)


def _train(docs):
    return cluster_spec(next(d for d in docs if d["metadata"]["name"] == "fedray-train"))


def _site_group(docs, site):
    return next(g for g in _train(docs)["workerGroupSpecs"] if g["groupName"] == f"site-{site}")


def _mount_site_on_head(docs):
    spec = _train(docs)["headGroupSpec"]["template"]["spec"]
    spec["volumes"].append({"name": "site-a-data", "persistentVolumeClaim":
                            {"claimName": "fedray-site-a-data", "readOnly": True}})
    spec["containers"][0]["volumeMounts"].append(
        {"name": "site-a-data", "mountPath": "/app/site", "readOnly": True})


def _claim(docs, site, volume, claim):
    spec = _site_group(docs, site)["template"]["spec"]
    next(v for v in spec["volumes"] if v["name"] == volume)["persistentVolumeClaim"]["claimName"] \
        = claim


SITE_GAPS = {  # one mistake each, and the words that must name it
    "head-mounts-a-site": (_mount_site_on_head, "fedray-train head: mounts site a's volumes"),
    "two-sites-in-one-pod": (lambda docs: _claim(docs, "a", "site-state", "fedray-site-b-state"),
                             "site-a: mounts the volumes of sites a, b"),
    "another-sites-resource": (
        lambda docs: _site_group(docs, "b")["rayStartParams"].update(
            resources='"{\\"hospital_a\\": 1}"'),
        "site-b: advertises {'hospital_a': 1}, not {'hospital_b': 1}"),
    "plain-json-resources": (
        lambda docs: _site_group(docs, "c")["rayStartParams"].update(
            resources='{"hospital_c": 1}'),
        "site-c: rayStartParams.resources '{\"hospital_c\": 1}' is not in KubeRay's format"),
    "writable-site-data": (
        lambda docs: _site_group(docs, "d")["template"]["spec"]["containers"][0]
        ["volumeMounts"][0].pop("readOnly"),
        "mounts fedray-site-d-data as [('/app/site', False)]"),
    "site-without-group": (
        lambda docs: _train(docs)["workerGroupSpecs"].pop(),
        "0 worker groups advertise hospital_d, not one"),
    "coordinator-in-an-actor": (
        lambda docs: next(d for d in docs if d["metadata"]["name"] == "fedray-train")["spec"]
        .update(entrypoint="fedray train --config configs/sites-k8s.yaml "
                           "--set runtime.coordinator=actor --output-dir /app/runs"),
        "runtime.coordinator is 'actor'"),
    "run-folder-off-the-volume": (
        lambda docs: next(d for d in docs if d["metadata"]["name"] == "fedray-train")["spec"]
        .update(entrypoint="fedray train --config configs/sites-k8s.yaml --output-dir runs"),
        "--output-dir runs is not on the head's runs volume"),
}


@pytest.mark.parametrize("gap", list(SITE_GAPS))
def test_a_site_gap_is_named(gap):
    edit, expected = SITE_GAPS[gap]
    docs = copy.deepcopy(base_docs())
    edit(docs)
    problems = site_problems(docs) + train_site_problems(docs)
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem found"


# --- locked down: token auth, NetworkPolicies, non-root pods, bounded disk -----------------

TOKEN_SECRET = "fedray-ray-token"   # authOptions.secretName of every cluster
TOKEN_KEY = "auth_token"            # the Secret's key that KubeRay reads the token from
AUTH_VARIABLES = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CLUSTER_LABEL = "fedray.io/cluster"
SUBMITTER = {"fedray.io/submitter": "true"}
SERVE_CLIENT = {"fedray.io/serve-client": "true"}
OPERATOR = {"app.kubernetes.io/component": "kuberay-operator"}
DASHBOARD, CLIENT, GCS, SERVE = 8265, 10001, 6379, 8000
# metrics, workers, agent; Serve's HAProxy stats and metrics, and a replica's own HTTP port
PROBE_PORTS = (GCS, DASHBOARD, CLIENT, SERVE, 8080, 10002, 19999, 52365, 8404, 9101, 30000)
RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def with_shell(docs: list[dict]) -> list[dict]:
    return docs + load_docs(K8S / "storage-shell.yaml")


def all_pod_specs(doc: dict) -> list[dict]:
    return [doc["spec"]] if doc["kind"] == "Pod" else pod_specs(doc)


def dockerfile_user() -> tuple[int, int]:
    """The image's final USER as numbers (a name would leave runAsNonRoot unverifiable)."""
    users = re.findall(r"^USER (\S+)$", (K8S / "Dockerfile").read_text(), flags=re.M)
    assert users, "k8s/Dockerfile sets no USER: the image would run as root"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"k8s/Dockerfile's last USER {users[-1]!r} is not numeric uid:gid"
    uid, gid = int(match[1]), int(match[2])
    assert uid != 0, "k8s/Dockerfile ends as root"
    return uid, gid


def auth_problems(docs: list[dict]) -> list[str]:
    """Every cluster takes Ray's token from the Secret; nothing turns it off or replaces it."""
    problems = []
    for doc in ray_docs(docs):
        name, spec = f"{doc['kind']}/{doc['metadata']['name']}", cluster_spec(doc)
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token":
            problems.append(f"{name}: authOptions.mode is {auth.get('mode')!r}, not 'token'")
        if auth.get("secretName") != TOKEN_SECRET:
            problems.append(f"{name}: authOptions.secretName is {auth.get('secretName')!r}, "
                            f"not the Secret {TOKEN_SECRET}")
        if auth.get("enableK8sTokenAuth"):
            problems.append(f"{name}: enableK8sTokenAuth (KubeRay: RayCluster only, no Secret)")
        ray = tuple(int(x) for x in spec["rayVersion"].split(".")[:2])
        if ray < (2, 52):
            problems.append(f"{name}: Ray {spec['rayVersion']} has no token auth (2.52+)")
        for container in containers(doc):  # KubeRay keeps a container's own value of these
            own = {e["name"] for e in container.get("env", [])} & AUTH_VARIABLES
            if own:
                problems.append(f"{name}: {container['name']} sets {sorted(own)} itself, "
                                "overriding the Secret's token")
    problems += [f"Secret/{d['metadata']['name']}: a token committed to the repository"
                 for d in docs if d["kind"] == "Secret"]
    return problems


def dashboard_problems(docs: list[dict]) -> list[str]:
    """A dashboard beyond loopback (KubeRay's default is 0.0.0.0) only behind token auth: it
    runs any job it is sent, and jobs read the volumes and the pods' Secrets."""
    problems = []
    for doc in ray_docs(docs):
        spec = cluster_spec(doc)
        host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
        if host not in LOOPBACK and (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: the dashboard listens "
                            f"on {host} without token auth")
    return problems


def security_problems(docs: list[dict]) -> list[str]:
    """Every container runs as the image's non-root user, cannot gain privileges, holds no
    capability and runs under the runtime's default seccomp profile."""
    uid, gid = dockerfile_user()
    problems = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for spec in all_pod_specs(doc):
            pod = spec.get("securityContext") or {}
            for container in spec["containers"] + spec.get("initContainers", []):
                own = container.get("securityContext") or {}
                where = f"{name} {container['name']}"
                effective = {k: own.get(k, pod.get(k)) for k in
                             ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")}
                if effective["runAsNonRoot"] is not True:
                    problems.append(f"{where}: runAsNonRoot is not true")
                if (effective["runAsUser"], effective["runAsGroup"]) != (uid, gid):
                    problems.append(f"{where}: runs as {effective['runAsUser']}:"
                                    f"{effective['runAsGroup']}, the image's user is {uid}:{gid}")
                if effective["seccompProfile"] != {"type": "RuntimeDefault"}:
                    problems.append(f"{where}: seccompProfile {effective['seccompProfile']}")
                problems += [f"{where}: securityContext.{k} is {own.get(k)!r}, not {v!r}"
                             for k, v in RESTRICTED.items() if own.get(k) != v]
                if own.get("privileged"):
                    problems.append(f"{where}: privileged")
        for options in find(doc, "autoscalerOptions"):  # a sidecar in the head pod
            own = options.get("securityContext") or {}
            problems += [f"{name} autoscaler: securityContext.{k} is {own.get(k)!r}, not {v!r}"
                         for k, v in RESTRICTED.items() if own.get(k) != v]
    return problems


def storage_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        resources = [(c["name"], c.get("resources", {})) for c in containers(doc)]
        resources += [("autoscaler", a.get("resources", {}))
                      for a in find(doc, "autoscalerOptions")]
        for container, r in resources:
            for kind in ("requests", "limits"):
                value = r.get(kind, {}).get("ephemeral-storage")
                if value is None or quantity(value) <= 0:
                    problems.append(f"{doc['metadata']['name']} {container}: no "
                                    f"ephemeral-storage in {kind}")
    return problems


# NetworkPolicy semantics, for the fields these manifests may use: a pod that some policy
# selects takes only what a rule of one of those policies admits; an empty or missing `from`
# admits everyone, missing `ports` every port; a peer with only podSelector means this
# namespace, a namespaceSelector ({} is every namespace) other namespaces too.

def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, values = expr["key"], expr.get("values", [])
        matches = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                   "Exists": key in labels, "DoesNotExist": key not in labels}
        if not matches[expr["operator"]]:
            return False
    return True


def source(labels: dict, namespace: str = "same", namespace_labels: dict | None = None) -> dict:
    return {"labels": labels, "namespace": namespace, "namespace_labels": namespace_labels or {}}


def peer_admits(peer: dict, src: dict) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, \
        f"{peer}: an ipBlock admits by address, which no pod label can vouch for"
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], src["namespace_labels"]):
            return False
    elif src["namespace"] != "same":
        return False
    return selects(peer.get("podSelector", {}), src["labels"])


def rule_ports(rule: dict) -> list[int] | None:
    """The TCP ports a rule opens, None for all of them."""
    if not rule.get("ports"):
        return None
    ports = []
    for entry in rule["ports"]:
        assert entry.get("protocol", "TCP") == "TCP" and isinstance(entry["port"], int), entry
        ports += range(entry["port"], entry.get("endPort", entry["port"]) + 1)
    return ports


def reachable(policies: list[dict], target: dict, src: dict, port: int) -> bool:
    """Whether `src` may open a TCP connection to `port` of a pod labelled `target` in the
    policies' namespace."""
    selecting = [p for p in policies if selects(p["spec"]["podSelector"], target)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    return any((not rule.get("from") or any(peer_admits(peer, src) for peer in rule["from"]))
               and (rule_ports(rule) is None or port in rule_ports(rule))
               for policy in selecting for rule in policy["spec"].get("ingress", []))


def ray_pods(doc: dict) -> dict[str, dict]:
    """'head' and each worker group's name: the template's labels and declared ports."""
    spec = cluster_spec(doc)
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {name: {"labels": g["template"].get("metadata", {}).get("labels", {}),
                   "ports": {p["containerPort"] for c in g["template"]["spec"]["containers"]
                             for p in c.get("ports", [])}}
            for name, g in groups.items()}


def network_problems(docs: list[dict]) -> list[str]:
    """Each cluster's pods take every port from each other and nothing from anyone else, but
    the head's dashboard from the submitters (RayJobs: from KubeRay too; the standalone
    cluster: its Ray Client port as well) and the Serve workers' 8000 from serve clients."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if not policies:
        return ["no NetworkPolicy: every pod may reach every Ray port"]
    problems = []
    for policy in policies:
        name, spec = policy["metadata"]["name"], policy["spec"]
        if set(spec) - {"podSelector", "policyTypes", "ingress"} or \
                spec.get("policyTypes") != ["Ingress"]:
            problems.append(f"NetworkPolicy/{name}: only Ingress rules are checked here")
    clusters = {}
    for doc in ray_docs(docs):
        pods = ray_pods(doc)
        names = {pod["labels"].get(CLUSTER_LABEL) for pod in pods.values()}
        if len(names) != 1 or None in names:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: its pods' {CLUSTER_LABEL} "
                            f"labels are {names}, not one name")
        clusters[(doc["kind"], doc["metadata"]["name"])] = (doc, pods, names.pop())
    if len({label for _, _, label in clusters.values()}) != len(clusters):
        problems.append(f"two clusters share a {CLUSTER_LABEL} label: {clusters.keys()}")
    strangers = [source({}), source(SUBMITTER, "other", {}), source(SERVE_CLIENT, "other", {})]
    for (kind, cr_name), (_, pods, label) in clusters.items():
        others = [source(p["labels"]) for key, (_, ps, _) in clusters.items()
                  if key != (kind, cr_name) for p in ps.values()]
        for group, pod in pods.items():
            where = f"{kind}/{cr_name} {group}"
            if not any(selects(p["spec"]["podSelector"], pod["labels"]) for p in policies):
                problems.append(f"{where}: no NetworkPolicy selects it")
                continue
            head = group == "head"
            expected = {  # port -> who else may connect
                DASHBOARD: (head, head and kind != "RayCluster"),
                CLIENT: (head and kind == "RayCluster", False),
            }
            for port in PROBE_PORTS:
                for peer in pods.values():
                    if not reachable(policies, pod["labels"], source(peer["labels"]), port):
                        problems.append(f"{where}: its own cluster cannot reach port {port}")
                for stranger in strangers + others + [source(pod["labels"], "other")]:
                    if reachable(policies, pod["labels"], stranger, port):
                        problems.append(f"{where}: {stranger} reaches port {port}")
                submitter, operator = expected.get(port, (False, False))
                serve = kind == "RayService" and not head and port == SERVE
                for src, allowed, who in (
                        (source(SUBMITTER), submitter, "a submitter"),
                        (source(OPERATOR, "other", {}), operator, "the KubeRay operator"),
                        (source(SERVE_CLIENT), serve, "a serve client")):
                    if reachable(policies, pod["labels"], src, port) != allowed:
                        problems.append(f"{where}: {who} {'cannot' if allowed else 'can'} "
                                        f"reach port {port}")
            for policy in policies:  # what comes from outside the cluster, on ports it declares
                if not selects(policy["spec"]["podSelector"], pod["labels"]):
                    continue
                for rule in policy["spec"].get("ingress", []):
                    own = [p for p in rule.get("from", [])
                           if set(p) == {"podSelector"} and
                           p["podSelector"].get("matchLabels", {}).get(CLUSTER_LABEL) == label]
                    if len(own) != len(rule.get("from", [])) or not own:
                        ports = rule_ports(rule)
                        if ports is None or not set(ports) <= pod["ports"]:
                            problems.append(f"{where}: NetworkPolicy/{policy['metadata']['name']} "
                                            f"opens {ports or 'every port'} to other pods, "
                                            f"not only ports it declares ({sorted(pod['ports'])})")
    for job in (d for d in docs if d["kind"] == "RayJob"):
        labels = job["spec"].get("submitterPodTemplate", {}).get("metadata", {}).get("labels", {})
        if not SUBMITTER.items() <= labels.items():
            problems.append(f"RayJob/{job['metadata']['name']}: its submitter lacks {SUBMITTER} "
                            "and could not reach the dashboard")
    return problems


def sources() -> list[tuple[str, list[dict]]]:
    return [("base", base_docs())] + [(name, render(K8S / "overlays" / name)) for name in OVERLAYS]


LOCK_DOWN = {
    "token-auth-from-the-secret": auth_problems,
    "no-dashboard-open-without-auth": dashboard_problems,
    "network-policies-fence-each-cluster": network_problems,
    "containers-restricted-non-root": lambda docs: security_problems(with_shell(docs)),
    "ephemeral-storage-bounded": lambda docs: storage_problems(with_shell(docs)),
}


@pytest.mark.parametrize("check", list(LOCK_DOWN))
def test_locked_down(check):
    problems = [f"{name}: {problem}" for name, docs in sources()
                for problem in LOCK_DOWN[check](docs)]
    assert not problems, "\n".join(problems)


def test_the_token_secret_is_documented_as_kuberay_reads_it():
    """The `kubectl create secret` line in the manifests makes the Secret the clusters name,
    with the key KubeRay reads."""
    text = "\n".join(p.read_text() for p in sorted((K8S / "base").glob("*.yaml")))
    made = re.findall(r"kubectl create secret generic (\S+) --from-literal=(\w+)=", text)
    assert (TOKEN_SECRET, TOKEN_KEY) in made, made


def _spec(docs, kind):
    return cluster_spec(next(d for d in docs if d["kind"] == kind))


GAPS = {  # one hole each, and the words that must name it
    "no-auth-on-serve": (lambda docs: _spec(docs, "RayService").pop("authOptions"),
                         "RayService/fedray: authOptions.mode is None"),
    "auth-disabled": (lambda docs: _spec(docs, "RayCluster")["authOptions"].update(mode="disabled"),
                      "the dashboard listens on 0.0.0.0 without token auth"),
    "auth-env-override": (
        lambda docs: _spec(docs, "RayJob")["headGroupSpec"]["template"]["spec"]["containers"][0]
        .setdefault("env", []).append({"name": "RAY_AUTH_MODE", "value": "disabled"}),
        "overriding the Secret's token"),
    "no-policies": (lambda docs: docs.__setitem__(slice(None), [d for d in docs
                                                               if d["kind"] != "NetworkPolicy"]),
                    "no NetworkPolicy"),
    "open-rule": (lambda docs: next(d for d in docs if d["metadata"]["name"] == "fedray-head")
                  ["spec"]["ingress"].append({"ports": [{"port": GCS}]}),
                  "reaches port 6379"),
    "unlabelled-workers": (
        lambda docs: _spec(docs, "RayService")["workerGroupSpecs"][0]["template"].pop("metadata"),
        "RayService/fedray gpu: no NetworkPolicy selects it"),
    "submitter-unlabelled": (
        lambda docs: next(d for d in docs if d["kind"] == "RayJob")["spec"]
        ["submitterPodTemplate"].pop("metadata"),
        "its submitter lacks"),
    "root": (lambda docs: _spec(docs, "RayCluster")["workerGroupSpecs"][0]["template"]["spec"]
             ["securityContext"].update(runAsUser=0),
             "runs as 0:100"),
    "escalation": (lambda docs: _spec(docs, "RayService")["headGroupSpec"]["template"]["spec"]
                   ["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
                   "allowPrivilegeEscalation is True"),
    "capabilities-kept": (lambda docs: next(d for d in docs if d["kind"] == "RayJob")["spec"]
                          ["submitterPodTemplate"]["spec"]["containers"][0].pop("securityContext"),
                          "ray-job-submitter: securityContext.capabilities is None"),
    "unbounded-disk": (lambda docs: _spec(docs, "RayCluster")["headGroupSpec"]["template"]["spec"]
                       ["containers"][0]["resources"]["limits"].pop("ephemeral-storage"),
                       "ray-head: no ephemeral-storage in limits"),
}


@pytest.mark.parametrize("gap", list(GAPS))
def test_a_lock_down_gap_is_named(gap):
    edit, expected = GAPS[gap]
    docs = copy.deepcopy(base_docs())
    edit(docs)
    problems = [p for check in LOCK_DOWN.values() for p in check(docs)]
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem found"
