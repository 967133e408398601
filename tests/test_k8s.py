"""The Kubernetes deployment (k8s/): KubeRay v1.7.0 schemas, the Serve config, and resources
that agree with each other, with the image and with the configs they name. No cluster needed.

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
    (sized by fedray.runtime as the run will size them) and the coordinator."""
    from fedray.config import load_config
    from fedray.runtime import hospital_placement

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
    of that shape as trials wait: fedray.tune refuses only a bundle no node shape holds), and
    the sweep folder is written on the runs volume, which every pod mounts."""
    from fedray import tune

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


def test_hospital_data_is_read_only_and_claims_exist():
    docs = base_docs()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in ray_docs(docs):
        for spec in pod_specs(doc):
            volumes = {v["name"]: v["persistentVolumeClaim"] for v in spec.get("volumes", [])}
            assert set(c["claimName"] for c in volumes.values()) <= claims
            for mount in (m for c in spec["containers"] for m in c.get("volumeMounts", [])):
                claim = volumes[mount["name"]]
                if claim["claimName"] == "fedray-hospital-data" or doc["kind"] == "RayService":
                    assert mount.get("readOnly") and claim.get("readOnly"), \
                        f"{doc['metadata']['name']} mounts {mount['mountPath']} writable"
    for job in (d for d in docs if d["kind"] == "RayJob"):
        mounts = {m["mountPath"] for c in containers(job) for m in c.get("volumeMounts", [])}
        assert {"/app/data", "/app/runs"} <= mounts, job["metadata"]["name"]


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
