"""The Serve application end to end: a real local Serve on 127.0.0.1, from serve/config.yaml.

Two applications of serve.app:build_app run side by side on one Serve instance, deployed the
way `serve deploy` and a RayService deploy them (the controller's declarative config path):
  main    (/)        the combined topology (one Service deployment, as `fedray serve`
                     deploys on CPU), open, small limits so that oversized images are cheap
                     to make
  secure  (/secure)  serve/config.yaml's split topology (Ingress + Model deployments), bearer
                     token from an env var, TorchScript runtime, a Model with one
                     slot and a queue of one, to overload on purpose, and a short
                     request_timeout_s, to time a stalled upload out
The packages are two tiny 32 px smallcnn runs (seeds 0 and 1) exported with export_package,
each with its validation split, so they carry an out-of-distribution threshold.
Hot swap is a redeploy of the same config with the Model's user_config changed, exactly what
editing a serve config or a RayService's serveConfigV2 does, so it runs last.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import local_coordinator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fedray.config import ConfigError
from fedray.artifacts.package import export_package, load_package
from fedray.serving import parse_args

REPO = Path(__file__).resolve().parents[1]
TOKEN_ENV = "FEDRAY_TEST_API_TOKEN"
TOKEN = "s3cret-token"
UNSET_ENV = "FEDRAY_TEST_UNSET_API_TOKEN"  # never set: a token variable that is missing
MAIN_LIMITS = {"max_image_bytes": 200_000, "max_pixels": 256 * 256, "max_batch_images": 4}
SECURE_TIMEOUT_S = 8.0

pytestmark = [pytest.mark.ray, pytest.mark.slow]


# --------------------------------------------------------------------------- helpers


def _png(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected(package, data: bytes) -> np.ndarray:
    """In-process probabilities of one encoded image, decoded as training decodes."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return package.predict_proba(package.preprocess([rgb])).numpy()[0]


def _probs(body: dict, classes: tuple[str, ...]) -> np.ndarray:
    assert list(body["probabilities"]) == list(classes)
    return np.array([body["probabilities"][c] for c in classes])


# --------------------------------------------------------------------------- fixtures


def _train(run_dir: Path, shard_dir: Path, seed: int) -> Path:
    coordinator = local_coordinator(run_dir, shard_dir, seed=seed)
    (run_dir / "config.yaml").write_text(coordinator.config.to_yaml())
    while coordinator.run_round() is not None:
        pass
    coordinator.finish()
    shutil.copytree(shard_dir, run_dir / "data")  # as `fedray train` keeps them: val included
    return run_dir


@pytest.fixture(scope="module")
def packages(tmp_path_factory, shard_dir) -> dict[str, Path]:
    """Two packages of the same architecture trained with different seeds, and a tampered one."""
    root = tmp_path_factory.mktemp("serve_packages")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        run = _train(root / f"run_{name}", shard_dir, seed)
        out[name] = export_package(run, root / f"pkg_{name}", name="tiny", version=name)
    tampered = root / "pkg_tampered"
    shutil.copytree(out["b"], tampered)
    weights = tampered / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    out["tampered"] = tampered
    return out


@pytest.fixture(scope="module")
def in_process(packages):
    return {name: load_package(packages[name]) for name in ("a", "b")}


@pytest.fixture(scope="module")
def smears() -> list[bytes]:
    """PNG smears at 48 px: the service resizes them to the model's 32 px."""
    from fedray.data import synth

    table = synth.generate(n=24, size=48, seed=11, patients_per_class=2)
    return table.column("image").to_pylist()


# The combined topology's one deployment (serve/config.yaml ships the split one).
COMBINED_DEPLOYMENTS = [{"name": "Service", "max_ongoing_requests": 64,
                         "max_queued_requests": 512}]


def _config(packages: dict[str, Path], model_user_config: dict | None = None) -> dict:
    """serve/config.yaml's application twice over (combined, and split as shipped), with test
    args and small replicas."""
    template = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]

    def app(name: str, prefix: str, args: dict, model: dict, env: dict | None = None) -> dict:
        spec = {**template, "name": name, "route_prefix": prefix,
                "args": {**template["args"], "package": str(packages["a"]), "device": "cpu",
                         "auth_token_env": None, "allow_unauthenticated": False, **args},
                "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO), **(env or {})}}}
        combined = spec["args"].get("topology") == "combined"
        deployments = []
        for dep in COMBINED_DEPLOYMENTS if combined else template["deployments"]:
            dep = {k: v for k, v in dep.items() if k != "autoscaling_config"}
            dep.update(num_replicas=1, ray_actor_options={"num_cpus": 0.25, "num_gpus": 0})
            if dep["name"] in ("Model", "Service"):  # the deployment that holds the model
                dep.update(model)
            deployments.append(dep)
        spec["deployments"] = deployments
        return spec

    main_model = {"user_config": model_user_config} if model_user_config else {}
    return {"applications": [
        app("main", "/", {**MAIN_LIMITS, "max_batch_size": 8, "topology": "combined",
                          "streams": 2},
            main_model),
        app("secure", "/secure", {"auth_token_env": TOKEN_ENV, "runtime": "torchscript",
                                  "max_batch_size": 1, "max_batch_images": 8,
                                  "request_timeout_s": SECURE_TIMEOUT_S},
            {"max_ongoing_requests": 1, "max_queued_requests": 1}, env={TOKEN_ENV: TOKEN}),
    ]}


def _deploy(config: dict, timeout_s: float = 150.0) -> None:
    """Apply a multi-application config as `serve deploy` does, and wait until it is running.

    Serve's own client (private API) stands in for the dashboard's REST endpoint that
    `serve deploy` calls: the session's Ray runs without a dashboard.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    names = {a["name"] for a in config["applications"]}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status for n in names if n in apps}
        failed = {n: apps[n].message for n, s in states.items() if s == "DEPLOY_FAILED"}
        assert not failed, failed
        if len(states) == len(names) and all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"applications not running after {timeout_s}s: {serve.status()}")


@pytest.fixture(scope="module")
def service(ray_session, packages) -> dict:
    from ray import serve

    port = _free_port()
    proxy_timeout = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())[
        "http_options"]["request_timeout_s"]
    serve.start(http_options={"host": "127.0.0.1", "port": port,
                              "request_timeout_s": proxy_timeout})
    try:
        _deploy(_config(packages))
        base = f"http://127.0.0.1:{port}"
        yield {"url": base, "secure": f"{base}/secure", "packages": packages}
    finally:
        serve.shutdown()


@pytest.fixture()
def http():
    with requests.Session() as session:
        yield session


def _predict(http, url: str, data: bytes, **kwargs) -> requests.Response:
    return http.post(f"{url}/v1/predict", files={"file": ("smear.png", data, "image/png")},
                     timeout=30, **kwargs)


def _still_serving(http, url: str, data: bytes, **kwargs) -> None:
    """The service answers a good request (within a few seconds: an overload drains first)."""
    deadline = time.monotonic() + 10
    while (response := _predict(http, url, data, **kwargs)).status_code == 503 and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- no Serve needed


def test_config_file_is_a_serve_config_of_this_app():
    import importlib.util

    from ray.serve.schema import ServeDeploySchema

    from fedray.serving import build_app

    spec = importlib.util.spec_from_file_location("serve_app", REPO / "serve" / "app.py")
    serve_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_app)

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
    assert serve_app.build_app is build_app
    assert {d.name for d in app.deployments} == {"Ingress", "Model"}
    parsed = parse_args(app.args)
    assert parsed.topology == "split"  # the shape the RayService (k8s/) deploys
    assert parsed.max_batch_size == 16 and parsed.auth_token_env == "FEDRAY_API_TOKEN"
    # The app's own deadline answers first (JSON 504); Serve's proxy timeout is the backstop.
    assert parsed.min_image_side == 32
    assert raw["http_options"]["request_timeout_s"] > parsed.request_timeout_s
    # Open without the token only because it listens on loopback.
    assert parsed.allow_unauthenticated and raw["http_options"]["host"] == "127.0.0.1"


def test_a_token_variable_that_is_unset_or_empty_fails_closed():
    from fedray.serving import auth_token

    args = parse_args({"package": "p", "auth_token_env": "API_TOKEN"})
    for environ in ({}, {"API_TOKEN": ""}, {"API_TOKEN": "  "}):
        with pytest.raises(ConfigError, match="API_TOKEN.*unset or empty.*allow_unauthenticated"):
            auth_token(args, environ)
    assert auth_token(args, {"API_TOKEN": " t0k "}) == "t0k"
    opted_out = parse_args({"package": "p", "auth_token_env": "API_TOKEN",
                            "allow_unauthenticated": True})
    assert auth_token(opted_out, {}) is None
    assert auth_token(opted_out, {"API_TOKEN": "t0k"}) == "t0k"  # a token is still required
    assert auth_token(parse_args({"package": "p"}), {"API_TOKEN": "t0k"}) is None


def test_cli_refuses_an_unset_token_variable_before_starting_ray(packages):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", UNSET_ENV)}
    done = subprocess.run(
        [sys.executable, "-m", "fedray.cli", "serve", str(packages["a"]), "--port", "1",
         "--auth-token-env", UNSET_ENV], check=False, env=env, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{UNSET_ENV}, which is unset or empty" in done.stderr
    assert "--allow-unauthenticated" in done.stderr and "Started a local Ray" not in done.stderr


def test_cli_haproxy_ingress_needs_a_ray_it_starts(packages, monkeypatch, capsys):
    """--ingress haproxy is refused by name where Ray is already there (Serve reads the flag
    when Ray starts), before anything is deployed."""
    from fedray import cli

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never contacted: refused before
    assert cli.main(["serve", str(packages["a"]), "--allow-unauthenticated",
                     "--ingress", "haproxy"]) == 2
    err = capsys.readouterr().err
    assert "--ingress haproxy needs a Ray that this command starts" in err
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in err


def test_haproxy_ingress_keeps_its_files_in_a_private_folder(monkeypatch):
    """Serve's HAProxy files go to a folder of this process's own (mode 0700), not the shared
    /tmp/haproxy-serve; the default ingress leaves HAProxy off."""
    import stat

    from fedray import serving

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if not k.startswith("RAY_SERVE_")})
    assert serving.use_fast_path() == serving.FAST_PATH_ENV
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    used = serving.use_fast_path("haproxy")
    assert used["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert used["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    folder = Path(used["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and "haproxy-serve" not in str(folder)
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert Path(used[key]).parent == folder
    with pytest.raises(ValueError, match="ingress"):
        serving.use_fast_path("nginx")


def test_unknown_or_bad_args_are_refused_by_name():
    with pytest.raises(ConfigError, match="max_batchsize: unknown key"):
        parse_args({"package": "p", "max_batchsize": 8})
    with pytest.raises(ConfigError, match="device"):
        parse_args({"package": "p", "device": "tpu"})
    with pytest.raises(ConfigError, match="package"):
        parse_args({})


def test_cli_parser_imports_neither_ray_nor_torch():
    code = ("import sys, fedray.serving as s, argparse\n"
            "p = argparse.ArgumentParser(); sub = p.add_subparsers(); s.add_cli(sub)\n"
            "a = p.parse_args(['serve', 'pkg', '--min-replicas', '1', '--max-replicas', '3'])\n"
            "assert a.host == '127.0.0.1' and a.port == 8000 and a.blocking, a\n"
            "heavy = {'ray', 'torch'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    from fedray import cli

    args = cli.build_parser().parse_args(["serve", "pkg", "--no-blocking", "--replicas", "2"])
    assert args.func.__module__ == "fedray.serving" and not args.blocking


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"),
                                      ("JPEG", "RGB"), ("TIFF", "RGB"), ("PNG", "P")])
def test_served_decode_is_the_training_decode(smears, fmt, mode):
    from fedray.data.shards import decode_image
    from fedray.serving.images import Limits, Upload, decode_upload

    data = _png(Image.open(io.BytesIO(smears[4])).convert(mode), fmt)
    limits = Limits(max_image_bytes=10**6, max_pixels=10**6, max_batch_images=1)
    decoded = decode_upload(Upload("x", data), limits, 32, display_max=40)
    np.testing.assert_array_equal(decoded.model_input, decode_image(data, 32))
    assert decoded.display.shape == (40, 40, 3)


def _limits(**overrides):
    from fedray.serving.images import Limits

    return Limits(**{"max_image_bytes": 10**6, "max_pixels": 10**6, "max_batch_images": 4,
                     "min_side": 32, **overrides})


def _decode(data: bytes, **limits):
    from fedray.serving.images import Upload, decode_upload

    return decode_upload(Upload("x.png", data), _limits(**limits), 32).model_input


def _refusal(data: bytes) -> tuple[str, int, str]:
    from fedray.serving.images import RequestError

    with pytest.raises(RequestError) as caught:
        _decode(data)
    return caught.value.code, caught.value.status, caught.value.detail


def test_small_images_decode_in_place_as_in_a_thread_and_larger_ones_are_left(smears):
    from fedray.serving.images import RequestError, Upload, decode_small, decode_upload

    limits = _limits()
    small = Upload("s.png", smears[0])  # 48 x 48
    np.testing.assert_array_equal(decode_small(small, limits, 32).model_input,
                                  decode_upload(small, limits, 32).model_input)
    large = Upload("l.png", _png(np.full((200, 200, 3), 90, np.uint8)))
    assert decode_small(large, limits, 32) is None  # 40,000 pixels: for a thread
    assert decode_small(large, limits, 32, most_pixels=200 * 200) is not None
    for bad in (b"", b"hello, not an image", smears[0][: len(smears[0]) // 2],
                _png(np.zeros((20, 200, 3), np.uint8)), _frames("red", "blue", fmt="PNG"),
                b"\x89PNG" + bytes(300)):
        with pytest.raises(RequestError) as threaded:
            decode_upload(Upload("x.png", bad), limits, 32)
        with pytest.raises(RequestError) as in_place:
            decode_small(Upload("x.png", bad), limits, 32)
        assert (in_place.value.code, in_place.value.status, in_place.value.detail) == \
            (threaded.value.code, threaded.value.status, threaded.value.detail)


def test_high_bit_depth_images_are_scaled_not_clipped():
    from fedray.data.shards import decode_image

    ramp = (np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)  # 0 .. 64484
    data = _png(Image.fromarray(ramp))
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    expected = np.asarray(Image.fromarray(np.repeat(expected[..., None], 3, 2)).resize(
        (32, 32), Image.Resampling.BILINEAR))
    served = _decode(data)
    np.testing.assert_array_equal(served, expected)
    assert 100 < served.mean() < 155  # clipped to 8 bits it was nearly all white (mean ~254)
    np.testing.assert_array_equal(decode_image(data, 32), served)  # training decodes the same
    floats = np.linspace(0, 1, 48 * 48).reshape(48, 48)
    np.testing.assert_array_equal(
        _decode(_float_tiff(floats)), _decode(_png(np.repeat(
            np.rint(floats * 255).astype(np.uint8)[..., None], 3, 2))))
    code, status, detail = _refusal(_float_tiff(np.full((48, 48), np.nan)))
    assert (code, status) == ("unsupported_pixel_format", 422) and "NaN" in detail


def test_exif_orientation_is_applied():
    from fedray.data.shards import decode_image

    upright = np.zeros((64, 48, 3), np.uint8)
    upright[:16] = (255, 0, 0)  # a red band at the top of the upright picture
    # Stored turned 90 degrees with EXIF orientation 6 ("rotate 90 CW to view"), as cameras do.
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    served = _decode(buffer.getvalue())
    expected = _decode(_png(upright))
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 2
    assert served[2, 16, 0] > 200 and served[30, 16, 0] < 50
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), 32), served)


def test_multi_frame_and_small_images_are_refused_by_training_and_serving():
    from fedray.data.decode import DecodeError
    from fedray.data.shards import decode_image

    for data in (_frames("red", "blue"), _frames("red", "green", "blue", fmt="PNG")):
        code, status, detail = _refusal(data)
        assert (code, status) == ("multi_frame", 422) and "x.png" in detail
        with pytest.raises(DecodeError, match="frames"):
            decode_image(data, 32)
    assert _decode(_frames("red")).shape == (32, 32, 3)  # one frame is fine
    for size in ((1, 1), (31, 200), (200, 31)):
        code, status, detail = _refusal(_png(np.zeros((*size, 3), np.uint8)))
        assert (code, status) == ("image_too_small", 422), (size, code)
        assert f"{size[1]}x{size[0]}" in detail and "32" in detail
    assert _decode(_png(np.zeros((32, 300, 3), np.uint8))).shape == (32, 32, 3)


def test_predictions_beyond_the_threshold_abstain_with_probabilities(packages, in_process,
                                                                     smears):
    from fedray.serving.predictor import Predictor

    predictor = Predictor(str(packages["a"]))
    threshold = in_process["a"].card["ood"]["threshold"]
    odd = [_decode(data) for data in _odd_images().values()]
    normal = [_decode(data) for data in smears[:8]]
    answers = predictor.predict(odd + normal)
    for answer in answers[:len(odd)]:
        assert answer["abstain"] is True and answer["ood_score"] > threshold
        assert f"{threshold:.4f}" in answer["abstain_reason"]
        assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    for answer in answers[len(odd):]:
        assert answer["abstain"] is (answer["ood_score"] > threshold)
        assert (answer["abstain_reason"] is None) is (not answer["abstain"])
    assert sum(a["abstain"] for a in answers[len(odd):]) <= len(normal) // 2


def test_readiness_reads_state_without_a_forward_pass(packages):
    """Model.ready answers from what was checked at load: a model whose forward pass would now
    fail (or take long) still answers a probe at once, and never runs it."""
    from fedray.serving.deployments import Model

    async def scenario() -> None:
        model = Model.func_or_class({"package": str(packages["a"]), "device": "cpu"})
        await model.reconfigure({})
        package = model.predictor.served.package

        def forward(batch):
            raise AssertionError("readiness ran a forward pass")

        package.forward = forward
        ready = await model.ready()
        assert ready["model"]["hash"] == package.model_hash and ready["refused"] is None

    asyncio.run(scenario())


# ---- the Ingress's own code, outside Serve, with a stand-in Model handle


class _Response:
    """A stand-in DeploymentResponse: awaits `work`, records a cancel."""

    def __init__(self, work) -> None:
        self.work, self.cancelled = work, False

    def __await__(self):
        return self.work.__await__()

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def remote(self, *args):
        self.calls.append(_Response(self.fn(*args)))
        return self.calls[-1]


class _StandInModel:
    def __init__(self, hang: bool = False) -> None:
        async def info():
            return {"image_size": 32}

        async def predict_many(images):
            if hang:
                await asyncio.Event().wait()  # a model that never answers
            return [{"n": len(images), "image_size": 32} for _ in images]

        self.info, self.predict_many = _Method(info), _Method(predict_many)
        self.predict = _Method(lambda image: predict_many([image]))


def _ingress(model, **args):
    from fedray.serving.deployments import Ingress

    plain = Ingress.func_or_class.__mro__[1]  # the class serve.ingress wraps, without Serve
    return plain(model, {"package": "p", **args})


def _asgi_request(body: bytes, content_type: str, *, chunk: int = 65536, stall: bool = False):
    """A Starlette request whose body arrives in chunks; `stall`: the last never comes."""
    from starlette.requests import Request

    view, sent = memoryview(body), [0]

    async def receive() -> dict:
        start = sent[0]
        if stall and start + chunk >= len(body):
            await asyncio.Event().wait()  # the client stops sending
        sent[0] = start + chunk
        return {"type": "http.request", "body": bytes(view[start:start + chunk]),
                "more_body": sent[0] < len(body)}

    headers = [(b"content-type", content_type.encode()),
               (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/v1/predict/batch",
                    "headers": headers, "query_string": b""}, receive)


def _multipart(images: list[bytes], field: str = "files") -> tuple[bytes, str]:
    from urllib3 import encode_multipart_formdata

    return encode_multipart_formdata(
        [(field, (f"{i}.png", data, "image/png")) for i, data in enumerate(images)])


def test_batch_route_holds_one_image_at_a_time():
    """Peak Python memory of a whole /v1/predict/batch request (read, parse, decode) with 8
    images of ~270 kB: one image's bytes twice (its pieces and their join), not the body's
    (2.2 MB), let alone twice that. The bound: 2 x max_image_bytes + 256 KiB per request."""
    import tracemalloc

    rng = np.random.default_rng(5)
    images = [_png(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)) for _ in range(8)]
    part_limit = max(len(i) for i in images) + 1
    body, content_type = _multipart(images)
    model = _StandInModel()
    ingress = _ingress(model, max_image_bytes=part_limit, max_batch_images=8, max_pixels=10**6)

    async def route():
        return await ingress.predict_batch(_asgi_request(body, content_type))

    asyncio.run(route())  # decoders and parsers imported and warm: not part of a request
    model.predict_many.calls.clear()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        answers = asyncio.run(route())
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert [a["n"] for a in answers] == [8] * 8
    assert len(model.predict_many.calls) == 1
    print(f"batch of 8 x {part_limit} B (body {len(body)} B): peak {peak} B")
    assert peak < 2 * part_limit + 256 * 1024, peak
    assert peak < len(body) / 3, peak


def test_a_stalled_upload_or_model_gets_504_and_the_model_call_is_cancelled(smears):
    from fedray.serving.images import RequestError

    stalled = _ingress(_StandInModel(), request_timeout_s=0.5)
    body, content_type = _multipart(smears[:2])
    with pytest.raises(RequestError) as caught:
        asyncio.run(stalled.predict_batch(_asgi_request(body, content_type, stall=True)))
    assert (caught.value.code, caught.value.status) == ("request_timeout", 504)
    assert "/v1/predict/batch" in caught.value.detail and "0.5" in caught.value.detail

    hung = _StandInModel(hang=True)
    with pytest.raises(RequestError, match="request_timeout_s = 0.5"):
        asyncio.run(_ingress(hung, request_timeout_s=0.5).predict_batch(
            _asgi_request(body, content_type)))
    (call,) = hung.predict_many.calls
    assert call.cancelled


class _FastPathIngress:
    """A stand-in Ingress: what the fast path asks of the replica's servable object."""

    BODY = {"probabilities": {"Benign": 0.75, "Pro": 0.25}, "predicted": "Benign",
            "abstain": False, "model": {"name": "m", "version": "1", "hash": "h"},
            "latency_ms": 1.5, "image_size": 32}  # a key the Prediction schema drops

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def predict(self, request) -> dict:
        from fedray.serving.images import RequestError

        body = await request.body()
        self.bodies.append(body)
        if body == b"no token":
            raise RequestError("unauthorized", "missing or wrong bearer token", 401)
        if body == b"crash":
            raise KeyError("boom")
        return dict(self.BODY)


def _asgi_call(app, method: str, path: str, content_type: str | None, body: bytes = b"",
               root_path: str = "") -> tuple[int, dict, bytes]:
    headers = [] if content_type is None else [(b"content-type", content_type.encode())]
    scope = {"type": "http", "method": method, "path": path, "root_path": root_path,
             "headers": headers, "query_string": b""}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    head = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], head, b"".join(m.get("body", b"") for m in sent
                                          if m["type"] == "http.response.body")


def test_one_image_fast_path_answers_raw_images_and_passes_everything_else_on(monkeypatch):
    import json
    from types import SimpleNamespace

    from ray.serve.exceptions import RayServeException

    from fedray.serving import deployments
    from fedray.serving.schemas import Prediction

    passed = []

    async def app(scope, receive, send):  # FastAPI, standing in
        passed.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    ingress = _FastPathIngress()
    monkeypatch.setattr(deployments.serve, "get_replica_context",
                        lambda: SimpleNamespace(servable_object=ingress))
    fast = deployments.OneImageFastPath(app)

    status, head, body = _asgi_call(fast, "POST", "/v1/predict", "image/png", b"png bytes")
    assert status == 200 and head["content-type"] == "application/json"
    assert json.loads(body) == Prediction.model_validate(_FastPathIngress.BODY).model_dump(
        mode="json") and "image_size" not in json.loads(body)
    assert _asgi_call(fast, "POST", "/secure/v1/predict", "image/jpeg; q=1", b"jpeg",
                      root_path="/secure")[0] == 200  # under a route prefix
    assert ingress.bodies == [b"png bytes", b"jpeg"] and passed == []

    status, head, body = _asgi_call(fast, "POST", "/v1/predict", "image/png", b"no token")
    assert status == 401 and head["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"] == "unauthorized"
    status, _, body = _asgi_call(fast, "POST", "/v1/predict", "image/png", b"crash")
    assert status == 500 and json.loads(body)["error"] == "internal_error"
    assert "KeyError" in json.loads(body)["detail"]

    others = [("POST", "/v1/predict", "multipart/form-data; boundary=x"),  # FastAPI parses it
              ("POST", "/v1/predict", None), ("POST", "/v1/predict", "text/plain"),
              ("GET", "/v1/predict", "image/png"), ("POST", "/v1/predict/batch", "image/png"),
              ("POST", "/v1/explain", "image/png")]
    for method, path, content_type in others:
        assert _asgi_call(fast, method, path, content_type, b"x") == (299, {}, b"app")
    assert passed == [(m, p) for m, p, _ in others] and len(ingress.bodies) == 4

    def outside_serve():
        raise RayServeException("not in a replica")

    monkeypatch.setattr(deployments.serve, "get_replica_context", outside_serve)
    assert _asgi_call(fast, "POST", "/v1/predict", "image/png", b"x")[0] == 299


def test_the_app_serve_runs_has_the_fast_path():
    import inspect

    from fedray.serving.deployments import Ingress, OneImageFastPath

    # serve.ingress runs a copy of the FastAPI app, taken when the class is decorated
    served = inspect.getclosurevars(Ingress.func_or_class.__init__).nonlocals[
        "frozen_app_or_func"]
    outermost = served.build_middleware_stack()
    assert isinstance(outermost, OneImageFastPath)  # in front of FastAPI's own middleware
    assert type(outermost.app).__name__ == "ServerErrorMiddleware"


def test_user_config_sets_or_clears_the_batch_quiet_time(packages):
    from fedray.serving.deployments import Model

    model = Model.func_or_class({"package": str(packages["a"]), "device": "cpu",
                                 "batch_quiet_s": 0.003})
    asyncio.run(model.reconfigure({}))
    assert model._batcher.quiet_s == 0.003  # the args' value
    asyncio.run(model.reconfigure({"batch_quiet_s": None}))
    assert model._batcher.quiet_s is None  # no quiet rule
    asyncio.run(model.reconfigure({"batch_quiet_s": 0.0005}))
    assert model._batcher.quiet_s == 0.0005


def test_a_combined_service_checks_decodes_and_predicts_in_one_object(packages, in_process,
                                                                     smears):
    """topology: combined, outside Serve as Serve drives it: reconfigure loads the package, then
    the routes run the model in-process (no handle), with the same answers and refusals."""
    from fedray.serving.images import RequestError

    service = _ingress(None, package=str(packages["a"]), device="cpu", topology="combined",
                       max_batch_images=8)
    package = in_process["a"]

    async def scenario() -> None:
        await service.reconfigure({})
        await service.check_health()
        body, content_type = _multipart(smears[:3] + [_odd_images()["noise"]])
        answers = await service.predict_batch(_asgi_request(body, content_type))
        for answer, data in zip(answers, smears[:3]):
            np.testing.assert_allclose(_probs(answer, package.classes), _expected(package, data),
                                       atol=1e-5)
        assert answers[3]["abstain"] is True
        assert (await service._ask(service._model.ready.remote()))["model"]["hash"] == \
            package.model_hash
        tiny, content_type = _multipart([_png(np.zeros((4, 4, 3), np.uint8))])
        with pytest.raises(RequestError, match="a side under the minimum") as refused:
            await service.predict_batch(_asgi_request(tiny, content_type))
        assert refused.value.code == "image_too_small"
        await service.reconfigure({"package": str(packages["b"])})  # hot swap in place
        again = await service.predict_batch(_asgi_request(*_multipart(smears[:1])))
        assert again[0]["model"]["hash"] == in_process["b"].model_hash

    asyncio.run(scenario())


def test_predictor_keeps_serving_when_a_swap_fails(packages, in_process, smears):
    from fedray.artifacts.package import PackageError
    from fedray.serving.predictor import Predictor

    predictor = Predictor(str(packages["a"]))
    image = [np.asarray(Image.open(io.BytesIO(smears[0])).convert("RGB"))]
    before = predictor.predict(image)[0]
    with pytest.raises(PackageError, match="model.safetensors"):
        predictor.reload(str(packages["tampered"]))
    assert predictor.predict(image)[0] == before
    assert predictor.last_reload["ok"] is False
    predictor.reload(str(packages["b"]))
    after = predictor.predict(image)[0]
    assert after["model"]["hash"] == in_process["b"].model_hash != before["model"]["hash"]
    assert predictor.last_reload["ok"] is True


def test_model_cpus_default_to_this_commands_ray_shared_by_the_replicas():
    import argparse

    from fedray.serving import model_cpus

    def flags(**given):
        return argparse.Namespace(**{"model_cpus": None, "replicas": None,
                                     "max_replicas": None, **given})

    assert model_cpus(flags(), 2.0) == 2.0  # one replica: every CPU, so every torch thread
    assert model_cpus(flags(replicas=2), 8.0) == 4.0
    assert model_cpus(flags(max_replicas=3), 8.0) == 2.0
    assert model_cpus(flags(replicas=4), 2.0) == 1.0  # never under one
    assert model_cpus(flags(), None) == 1.0  # a running cluster's CPUs are not this command's
    assert model_cpus(flags(), 2.0, split=True) == 1.0  # one left for the Ingress (0.5 CPU)
    assert model_cpus(flags(), 8.0, split=True) == 7.0
    assert model_cpus(flags(model_cpus=0.25), 8.0) == 0.25
    with pytest.raises(ValueError, match="--model-cpus"):
        model_cpus(flags(model_cpus=0.0), 2.0)


def test_two_replicas_by_default_behind_haproxy_on_a_cpu_of_two_cores():
    import argparse

    from fedray.serving import local_replicas, model_cpus

    def flags(**given):
        return argparse.Namespace(**{"replicas": None, "min_replicas": None,
                                     "max_replicas": None, "model_cpus": None,
                                     "ingress": "haproxy", "device": "cpu", **given})

    assert local_replicas(flags(), 2.0, "combined") == 2
    assert model_cpus(flags(), 2.0, replicas=2) == 1.0  # half the CPUs each
    assert local_replicas(flags(device="auto"), 8.0, "combined") == 2  # auto: no GPU asked
    assert local_replicas(flags(), 1.0, "combined") == 1  # one core: one loop is enough
    assert local_replicas(flags(ingress="proxy"), 8.0, "combined") == 1  # the proxy bounds
    assert local_replicas(flags(device="cuda"), 8.0, "combined") == 1
    assert local_replicas(flags(), 8.0, "split") == 1  # the Ingress takes HTTP there
    for given in ({"replicas": 3}, {"min_replicas": 1}, {"max_replicas": 4}):
        assert local_replicas(flags(**given), 8.0, "combined") is None  # the user's choice
    assert model_cpus(flags(replicas=3), 8.0, replicas=None) == 2.0


def test_compute_streams_default_to_two_on_a_cpu_with_threads_to_share():
    from fedray.serving.predictor import compute_streams

    assert compute_streams(None, "cpu", threads=2) == 2
    assert compute_streams(None, "cpu", threads=8) == 2
    assert compute_streams(None, "cpu", threads=1) == 1  # one thread: nothing to share
    assert compute_streams(3, "cpu", threads=1) == 3  # asked for: kept
    assert compute_streams(None, "cuda", threads=8) == 1


def test_explanations_use_a_module_apart_from_the_predictions(packages, smears):
    """Streams run predictions on the served module while an explanation runs: attribution
    hooks and autograd go on a module of the explanation's own, and leave no trace."""
    from fedray.serving.predictor import Predictor

    predictor = Predictor(str(packages["a"]))
    image = np.asarray(Image.open(io.BytesIO(smears[0])).convert("RGB"))
    served = predictor.served.package.model
    before = predictor.predict([image])[0]
    for method in ("gradcam", "saliency"):
        explained = predictor.explain(image, method)
        assert explained["probabilities"] == before["probabilities"]
    explaining = predictor.served.explainable().model
    assert explaining is not served
    assert not {id(p) for p in explaining.parameters()} & {id(p) for p in served.parameters()}
    assert all(not m._forward_hooks and not m._backward_hooks for m in served.modules())
    assert all(p.grad is None for p in served.parameters())
    assert predictor.predict([image])[0] == before


def test_model_loads_the_package_its_config_names(packages, in_process):
    """The Model deployment's own code, outside Serve, called as Serve calls it: __init__,
    then reconfigure(user_config) before any traffic, then check_health."""
    from fedray.serving.deployments import Model

    good, bad = str(packages["b"]), str(packages["tampered"])
    gone = str(packages["a"].parent / "deleted-package")

    async def scenario() -> None:
        # args.package may be gone once user_config names another: only that one is loaded.
        model = Model.func_or_class({"package": gone, "device": "cpu"})
        await model.reconfigure({"package": good})
        await model.check_health()
        ready = await model.ready()
        assert ready["model"]["hash"] == in_process["b"].model_hash
        assert ready["package"] == good and ready["refused"] is None

        # A running replica refuses a bad package, keeps serving, and says so until the
        # config names a package it serves again.
        await model.reconfigure({"package": bad})
        ready = await model.ready()
        assert ready["model"]["hash"] == in_process["b"].model_hash
        assert ready["refused"]["package"] == bad
        assert "model.safetensors" in ready["refused"]["error"]
        await model.reconfigure({"package": good})
        assert (await model.ready())["refused"] is None

        # A starting replica whose config names a bad package never serves another one.
        starting = Model.func_or_class({"package": good, "device": "cpu"})
        with pytest.raises(ValueError, match="model.safetensors"):
            await starting.reconfigure({"package": bad})
        with pytest.raises(ValueError, match="max_batch_sise"):
            await starting.reconfigure({"max_batch_sise": 4})

        # No user_config at all (a config's `user_config: null`): args.package, at check_health.
        plain = Model.func_or_class({"package": good, "device": "cpu"})
        await plain.check_health()
        assert (await plain.ready())["package"] == good

    asyncio.run(scenario())


def test_cli_refuses_a_bad_package_before_starting_ray(packages, capsys):
    from fedray import cli

    assert cli.main(["serve", str(packages["tampered"]), "--port", "1"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


# --------------------------------------------------------------------------- endpoints


def test_predict_upload_and_raw_bodies_match_in_process(service, in_process, smears, http):
    url, package = service["url"], in_process["a"]
    rgb = np.asarray(Image.open(io.BytesIO(smears[0])).convert("RGB"))
    bodies = [(smears[0], "image/png"), (_png(rgb, "JPEG"), "image/jpeg"),
              (_png(rgb, "TIFF"), "image/tiff")]
    for data, content_type in bodies:
        for response in (
            http.post(f"{url}/v1/predict", data=data, headers={"Content-Type": content_type}),
            http.post(f"{url}/v1/predict", files={"file": ("x", data, content_type)}),
        ):
            assert response.status_code == 200, response.text
            body = response.json()
            probs = _probs(body, package.classes)
            np.testing.assert_allclose(probs, _expected(package, data), atol=1e-5)
            assert body["predicted"] == package.classes[int(np.argmax(probs))]
            assert body["model"] == {"name": "tiny", "version": "a", "hash": package.model_hash}
            assert body["latency_ms"] > 0


def test_batch_answers_in_order(service, in_process, smears, http):
    files = [("files", (f"s{i}.png", data, "image/png")) for i, data in enumerate(smears[:4])]
    response = http.post(f"{service['url']}/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body) == 4
    for item, data in zip(body, smears[:4]):
        probs = _probs(item, in_process["a"].classes)
        np.testing.assert_allclose(probs, _expected(in_process["a"], data), atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_explain_returns_prediction_and_heatmap_png(service, in_process, smears, http, method):
    response = http.post(f"{service['url']}/v1/explain", params={"method": method},
                         files={"file": ("s.png", smears[1], "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == method
    np.testing.assert_allclose(_probs(body, in_process["a"].classes),
                               _expected(in_process["a"], smears[1]), atol=1e-5)
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heat.format == "PNG" and heat.size == tuple(body["heatmap_size"]) == (48, 48)


def test_explain_default_method_and_unknown_method(service, smears, http):
    url = f"{service['url']}/v1/explain"
    ok = http.post(url, data=smears[1], headers={"Content-Type": "image/png"})
    assert ok.status_code == 200 and ok.json()["method"] == "gradcam"
    bad = http.post(url, params={"method": "lime"}, data=smears[1],
                    headers={"Content-Type": "image/png"})
    assert bad.status_code == 400 and bad.json()["error"] == "unknown_method"
    assert "lime" in bad.json()["detail"]


def test_model_card_health_readiness_and_openapi(service, in_process, http):
    url, package = service["url"], in_process["a"]
    card = http.get(f"{url}/v1/model").json()
    assert card["model"]["hash"] == package.model_hash
    assert card["card"]["name"] == "tiny" and card["classes"] == list(package.classes)
    assert card["image_size"] == 32 and card["runtime"] == "pytorch" and card["device"] == "cpu"
    assert card["streams"] == 2  # the config's
    assert http.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = http.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["model"]["hash"] == package.model_hash
    spec = http.get(f"{url}/openapi.json").json()
    for path in ("/v1/predict", "/v1/predict/batch", "/v1/explain"):
        post = spec["paths"][path]["post"]
        assert "multipart/form-data" in post["requestBody"]["content"]
        assert {"200", "400", "413", "415", "503"} <= set(post["responses"])
    assert "/v1/model" in spec["paths"] and "Prediction" in spec["components"]["schemas"]


# --------------------------------------------------------------------------- bad input


def _bomb() -> bytes:
    return _png(Image.new("1", (2000, 2000)))  # 4 Mpx in ~1 kB


def _frames(*colours: str, fmt: str = "TIFF") -> bytes:
    """A multi-frame (multi-page TIFF, animated PNG) image, one 48 px frame per colour."""
    frames = [Image.new("RGB", (48, 48), c) for c in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _float_tiff(values: np.ndarray) -> bytes:
    return _png(Image.fromarray(values.astype(np.float32), "F"), "TIFF")


def _odd_images() -> dict[str, bytes]:
    """Images no smear classifier can judge: blank slides and sensor noise, 64 px."""
    rng = np.random.default_rng(3)
    return {"white": _png(np.full((64, 64, 3), 255, np.uint8)),
            "black": _png(np.zeros((64, 64, 3), np.uint8)),
            "noise": _png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))}


def _bad_requests(smears: list[bytes]) -> list[tuple[str, str, dict, int, str, str]]:
    """(case, path, requests kwargs, status, error code, text the detail must contain)."""
    good = smears[0]
    noise = _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    gif = _png(Image.new("RGB", (8, 8)), "GIF")

    def raw(data: bytes, ctype: str) -> dict:
        return {"data": data, "headers": {"Content-Type": ctype}}

    def part(data: bytes, name: str = "a.png", field: str = "file", ctype: str = "image/png"):
        return {"files": {field: (name, data, ctype)}}

    return [
        ("not an image", "/v1/predict", raw(b"hello, not an image", "image/png"), 400,
         "not_an_image", "body"),
        ("not an image (part)", "/v1/predict", part(b"%PDF-1.4 ...", "report.pdf"), 400,
         "not_an_image", "report.pdf"),
        ("gif", "/v1/predict", part(gif, "x.gif", ctype="image/gif"), 400, "not_an_image",
         "JPEG, PNG or TIFF"),
        ("truncated", "/v1/predict", part(noise[: len(noise) // 2], "cut.png"), 400,
         "truncated_image", "cut.png"),
        ("zero bytes raw", "/v1/predict", raw(b"", "image/jpeg"), 400, "empty_image", "zero"),
        ("zero bytes part", "/v1/predict", part(b"", "empty.png"), 400, "empty_image",
         "empty.png"),
        ("text/plain", "/v1/predict", raw(good, "text/plain"), 415, "unsupported_media_type",
         "text/plain"),
        ("json", "/v1/predict", {"json": {"image": "x"}}, 415, "unsupported_media_type",
         "application/json"),
        ("part not an image type", "/v1/predict", part(good, "a.txt", ctype="text/plain"), 415,
         "unsupported_media_type", "a.txt"),
        ("over byte limit raw", "/v1/predict", raw(b"\x89PNG" + bytes(200_001), "image/png"), 413,
         "image_too_large", "200000"),
        ("over byte limit part", "/v1/predict", part(b"\xff\xd8" + bytes(200_000), "big.jpg"),
         413, "image_too_large", "big.jpg"),
        ("over pixel limit", "/v1/predict", part(_png(Image.new("L", (300, 300))), "wide.png"),
         413, "too_many_pixels", "300x300"),
        ("decompression bomb", "/v1/predict", part(_bomb(), "bomb.png"), 413,
         "decompression_bomb", "bomb.png"),
        ("batch over limit", "/v1/predict/batch",
         {"files": [("files", (f"{i}.png", good, "image/png")) for i in range(5)]}, 413,
         "batch_too_large", "5 images"),
        ("one bad part of a batch", "/v1/predict/batch",
         {"files": [("files", ("ok.png", good, "image/png")),
                    ("files", ("notes.txt", b"not an image", "application/octet-stream"))]},
         400, "not_an_image", "files[1] ('notes.txt')"),
        ("batch not multipart", "/v1/predict/batch", raw(good, "image/png"), 415,
         "unsupported_media_type", "multipart"),
        ("malformed multipart", "/v1/predict",
         raw(b"--xyz\r\nContent-Disposition: form-data\r\n\r\nbroken", "multipart/form-data; "
             "boundary=xyz"), 400, "malformed_multipart", "name"),
        ("multipart without boundary", "/v1/predict", raw(b"junk", "multipart/form-data"), 400,
         "malformed_multipart", "boundary"),
        ("missing file", "/v1/predict", part(good, field="image"), 400, "missing_file", "'file'"),
        ("missing files", "/v1/predict/batch", part(good, field="file"), 400, "missing_file",
         "'files'"),
        ("text field, not a file", "/v1/predict", {"files": {"file": (None, "hello")}}, 400,
         "not_a_file", "'file'"),
        ("two files to single predict", "/v1/predict",
         {"files": [("file", ("a.png", good)), ("file", ("b.png", good))]}, 400,
         "too_many_files", "batch"),
        ("one pixel", "/v1/predict", part(_png(np.zeros((1, 1, 3), np.uint8)), "dot.png"), 422,
         "image_too_small", "dot.png"),
        ("a side under the minimum", "/v1/predict",
         raw(_png(np.zeros((20, 200, 3), np.uint8)), "image/png"), 422, "image_too_small",
         "200x20"),
        ("small part of a batch", "/v1/predict/batch",
         {"files": [("files", ("ok.png", good, "image/png")),
                    ("files", ("dot.png", _png(np.zeros((8, 8, 3), np.uint8)), "image/png"))]},
         422, "image_too_small", "files[1] ('dot.png')"),
        ("multi-page tiff", "/v1/predict",
         part(_frames("red", "blue"), "stack.tif", ctype="image/tiff"), 422, "multi_frame",
         "stack.tif"),
        ("animated png", "/v1/predict", raw(_frames("red", "blue", fmt="PNG"), "image/png"), 422,
         "multi_frame", "2 frames"),
        ("float outside [0, 1]", "/v1/predict",
         part(_float_tiff(np.full((48, 48), 300.0)), "hdr.tif", ctype="image/tiff"), 422,
         "unsupported_pixel_format", "hdr.tif"),
    ]


def test_bad_input_gets_a_4xx_json_error_and_the_service_lives(service, smears, http):
    url = service["url"]
    failures = []
    for case, path, kwargs, status, code, text in _bad_requests(smears):
        response = http.post(f"{url}{path}", timeout=30, **kwargs)
        body = response.json() if response.headers.get("content-type") == "application/json" \
            else {"raw": response.text}
        if (response.status_code, body.get("error")) != (status, code) or \
                text not in body.get("detail", ""):
            failures.append(f"{case}: {response.status_code} {body}")
        _still_serving(http, url, smears[0])
    assert not failures, "\n".join(failures)
    assert http.get(f"{url}/v2/nothing").json()["error"] == "not_found"


def test_overload_is_a_quick_503_not_a_queue(service, smears, http):
    """32 requests at once against a Model that takes one and queues one: the rest are refused
    with 503 at once instead of waiting, and the accepted ones are answered."""
    url, auth = service["secure"], {"Authorization": f"Bearer {TOKEN}"}
    barrier = threading.Barrier(32)

    def one(i: int):
        barrier.wait(timeout=60)
        start = time.perf_counter()
        r = requests.post(f"{url}/v1/predict", data=smears[i % len(smears)], timeout=120,
                          headers={**auth, "Content-Type": "image/png"})
        return r, time.perf_counter() - start

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    statuses = [r.status_code for r, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    refused = [(r, t) for r, t in answers if r.status_code == 503]
    assert refused and 200 in statuses, statuses
    for r, seconds in refused:
        # At once, not after a queue: the bound is loose for a loaded 2-core CI box.
        assert seconds < 30
        assert r.json()["error"] == "overloaded" and r.headers["Retry-After"] == "1"
    _still_serving(http, url, smears[0], headers=auth)


def test_blank_and_noise_abstain_on_both_routes(service, in_process, smears, http):
    url, package = service["url"], in_process["a"]
    threshold = package.card["ood"]["threshold"]
    odd = _odd_images()
    for name, data in odd.items():
        body = _predict(http, url, data).json()
        assert body["abstain"] is True, (name, body)
        assert body["ood_score"] > threshold and f"{threshold:.4f}" in body["abstain_reason"]
        assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    files = [("files", ("smear.png", smears[0], "image/png"))] + [
        ("files", (f"{name}.png", data, "image/png")) for name, data in odd.items()]
    batch = http.post(f"{url}/v1/predict/batch", files=files[:4], timeout=30)
    assert batch.status_code == 200, batch.text
    answers = batch.json()
    assert [a["abstain"] for a in answers[1:]] == [True] * 3
    rgb = np.asarray(Image.open(io.BytesIO(smears[0])).convert("RGB"))
    _, scores = package.score(package.preprocess([rgb]))
    assert answers[0]["ood_score"] == pytest.approx(float(scores[0]), abs=1e-4)
    assert answers[0]["abstain"] is (float(scores[0]) > threshold)


def test_a_sixteen_bit_image_is_served_as_training_decodes_it(service, in_process, http):
    from fedray.data.shards import decode_image

    ramp = (np.add.outer(np.arange(48), np.arange(48)) * 600).astype(np.uint16)
    data = _png(Image.fromarray(ramp))
    response = http.post(f"{service['url']}/v1/predict", data=data,
                         headers={"Content-Type": "image/png"}, timeout=30)
    assert response.status_code == 200, response.text
    package = in_process["a"]
    expected = package.predict_proba(package.preprocess([decode_image(data, 32)])).numpy()[0]
    np.testing.assert_allclose(_probs(response.json(), package.classes), expected, atol=1e-5)


def test_a_stalled_upload_gets_a_json_504_over_http(service):
    """A client that sends half its body and stops: the Ingress's deadline answers, in JSON,
    before Serve's proxy timeout would (a socket, since HTTP clients always finish bodies)."""
    host, port = service["url"].removeprefix("http://").split(":")
    head = (f"POST /secure/v1/predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: image/png\r\n"
            "Content-Length: 100000\r\nConnection: close\r\n\r\n").encode()
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=120) as conn:
        conn.sendall(head + b"\x89PNG" + bytes(1000))
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    seconds = time.monotonic() - start
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 504 " in status_line, reply[:300]
    assert b'"request_timeout"' in rest and b"request_timeout_s = 8" in rest
    assert SECURE_TIMEOUT_S <= seconds < SECURE_TIMEOUT_S + 20


# --------------------------------------------------------------------------- auth


def test_bearer_token_guards_v1_but_not_health(service, in_process, smears, http):
    url = service["secure"]
    assert _predict(http, url, smears[0]).status_code == 401
    wrong = _predict(http, url, smears[0], headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    assert http.get(f"{url}/v1/model").status_code == 401
    assert http.get(f"{url}/v1/model", headers={"Authorization": TOKEN}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ok = _predict(http, url, smears[0], headers=auth)
    assert ok.status_code == 200, ok.text
    # This application serves the TorchScript copy: same weights, same answers.
    np.testing.assert_allclose(_probs(ok.json(), in_process["a"].classes),
                               _expected(in_process["a"], smears[0]), atol=1e-4)
    assert http.get(f"{url}/v1/model", headers=auth).json()["runtime"] == "torchscript"
    assert http.get(f"{url}/healthz").status_code == 200
    # Readiness stays open to probes, but says which model only to a caller /v1 admits.
    anonymous = http.get(f"{url}/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready", "model": None}
    named = http.get(f"{url}/readyz", headers=auth).json()
    assert named["model"]["hash"] == in_process["a"].model_hash
    assert _predict(http, service["url"], smears[0]).status_code == 200  # main is open


def test_ingress_refuses_to_start_without_its_token(service, packages, smears, http):
    """An app told to read its token from an unset variable fails to deploy, naming it (its
    Ingress never starts, so nothing answers /v1 there); the other applications serve on."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = _config(packages)
    main = config["applications"][0]
    locked = {**main, "name": "locked", "route_prefix": "/locked",
              "args": {**main["args"], "auth_token_env": UNSET_ENV}}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(
        {"applications": [*config["applications"], locked]}))
    deadline = time.monotonic() + 150
    while (app := serve.status().applications.get("locked")) is None or \
            app.status != "DEPLOY_FAILED":
        assert time.monotonic() < deadline, f"locked never failed: {serve.status()}"
        time.sleep(0.5)
    ingress = app.deployments["Service"]  # main's topology: the combined Service
    assert ingress.status != "HEALTHY"
    assert f"{UNSET_ENV}, which is unset or empty" in ingress.message, ingress.message
    _still_serving(http, service["url"], smears[0])
    _deploy(_config(packages))  # without it again
    deadline = time.monotonic() + 60
    while "locked" in serve.status().applications:
        assert time.monotonic() < deadline, "locked was not deleted"
        time.sleep(0.5)


def test_cli_serve_deletes_only_its_app_on_ctrl_c(service, packages, in_process, smears,
                                                  monkeypatch, http):
    """`fedray serve --device cpu` deploys the combined topology: one Service deployment that
    answers as the split one does; Ctrl-C deletes only that application."""
    from ray import serve

    import fedray.serving
    from fedray import cli

    seen = {}

    def interrupted() -> None:  # stands in for the wait that Ctrl-C ends
        seen["card"] = http.get(f"{service['url']}/cli/v1/model", timeout=30).json()
        seen["predict"] = _predict(http, f"{service['url']}/cli", smears[0])
        seen["odd"] = _predict(http, f"{service['url']}/cli", _odd_images()["noise"])
        seen["apps"] = set(serve.status().applications)
        seen["deployments"] = set(serve.status().applications["cli"].deployments)
        raise KeyboardInterrupt

    monkeypatch.setattr(fedray.serving, "wait_for_interrupt", interrupted)
    monkeypatch.chdir(packages["a"].parent)
    port = service["url"].rsplit(":", 1)[1]
    assert cli.main(["serve", packages["a"].name, "--port", port, "--name", "cli",
                     "--route-prefix", "/cli", "--device", "cpu", "--model-cpus", "0.25"]) == 0
    assert seen["apps"] >= {"cli", "main", "secure"}
    assert seen["card"]["package"] == str(packages["a"].resolve())  # relative path made absolute
    assert seen["deployments"] == {"Service"}
    assert seen["predict"].status_code == 200, seen["predict"].text
    np.testing.assert_allclose(_probs(seen["predict"].json(), in_process["a"].classes),
                               _expected(in_process["a"], smears[0]), atol=1e-5)
    assert seen["odd"].json()["abstain"] is True
    apps = serve.status().applications
    assert "cli" not in apps and {apps[n].status for n in ("main", "secure")} == {"RUNNING"}


# --------------------------------------------------------------------------- load


def test_sixteen_concurrent_clients_agree_with_in_process(service, in_process, smears):
    url, package = service["url"], in_process["a"]
    expected = [_expected(package, data) for data in smears]

    def client(k: int) -> list[tuple[int, int, dict]]:
        out = []
        with requests.Session() as session:
            for j in range(4):
                i = (k * 4 + j) % len(smears)
                r = _predict(session, url, smears[i])
                out.append((i, r.status_code, r.json()))
        return out

    with ThreadPoolExecutor(16) as pool:
        results = [item for chunk in pool.map(client, range(16)) for item in chunk]
    assert len(results) == 64
    assert all(status == 200 for _, status, _ in results), results
    for i, _, body in results:
        probs = _probs(body, package.classes)
        np.testing.assert_allclose(probs, expected[i], atol=1e-5)
        assert body["predicted"] == package.classes[int(np.argmax(expected[i]))]


# --------------------------------------------------------------------------- property-based

_CONTENT_TYPES = ["image/png", "image/jpeg", "image/tiff", "text/plain", "application/json",
                  "multipart/form-data", "multipart/form-data; boundary=b", "image/gif",
                  "application/octet-stream", "", "image/png; charset=utf-8", "x/y;;="]
_ENDPOINTS = ["/v1/predict", "/v1/predict/batch", "/v1/explain"]


def _mutated(seed_image: bytes):
    """Valid images with bytes flipped, cut or extended: the decoder's hardest inputs."""
    def mutate(args):
        cut, flips, tail = args
        data = bytearray(seed_image[: max(cut, 1)])
        for pos, value in flips:
            data[pos % len(data)] = value
        return bytes(data) + tail
    return st.tuples(st.integers(0, len(seed_image)),
                     st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
                     st.binary(max_size=16)).map(mutate)


_SETTINGS = settings(max_examples=75, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


def _no_5xx(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["error"], response.text


def test_random_bodies_never_give_5xx(service, smears, http):
    url = service["url"]
    seed = smears[2]

    @_SETTINGS
    @given(path=st.sampled_from(_ENDPOINTS), ctype=st.sampled_from(_CONTENT_TYPES),
           data=st.one_of(st.binary(max_size=2048), _mutated(seed)))
    def check(path, ctype, data):
        _no_5xx(http.post(f"{url}{path}", data=data, headers={"Content-Type": ctype}, timeout=30))

    check()
    _still_serving(http, url, seed)


def test_random_multipart_never_gives_5xx(service, smears, http):
    url = service["url"]
    seed = smears[3]
    part = st.tuples(st.sampled_from(["file", "files", "image", "", "f\u00e9"]),
                     st.one_of(st.none(), st.text(max_size=12)),
                     st.one_of(st.binary(max_size=512), _mutated(seed), st.just(seed)),
                     st.sampled_from(["image/png", "text/plain", "application/octet-stream",
                                      "image/jpeg", ""]))

    @_SETTINGS
    @given(path=st.sampled_from(_ENDPOINTS), parts=st.lists(part, max_size=6))
    def check(path, parts):
        files = [(field, (name, data, ctype) if ctype else (name, data))
                 for field, name, data, ctype in parts]
        if not files:
            files = {"file": ("empty", b"")}
        _no_5xx(http.post(f"{url}{path}", files=files, timeout=30))

    check()
    _still_serving(http, url, seed)


# --------------------------------------------------------------------------- hot swap (last)


def _model_info(http, url: str) -> dict:
    return http.get(f"{url}/v1/model", timeout=30).json()


def test_hot_swap_under_traffic_then_a_bad_package_is_refused(service, in_process, smears, http):
    url, packages = service["url"], service["packages"]
    old, new = in_process["a"].model_hash, in_process["b"].model_hash
    assert old != new
    replica = _model_info(http, url)["replica"]
    seen, errors, stop = [], [], threading.Event()

    def traffic() -> None:
        try:
            with requests.Session() as session:
                while not stop.is_set():
                    r = _predict(session, url, smears[5])
                    if r.status_code != 200:
                        errors.append((r.status_code, r.text[:200]))
                    else:
                        seen.append(r.json()["model"]["hash"])
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost with the thread
            errors.append(repr(exc))

    def wait_for(done, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and not errors:
            assert time.monotonic() < deadline and sender.is_alive(), \
                f"{what}: not within {timeout_s}s ({len(seen)} answers)"
            time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        wait_for(lambda: len(seen) >= 5, "answers from the old model")
        _deploy(_config(packages, {"package": str(packages["b"])}))
        wait_for(lambda: seen and seen[-1] == new, "answers from the new model")
        count = len(seen)
        wait_for(lambda: len(seen) >= count + 5, "answers after the swap")
    finally:
        stop.set()
        sender.join(timeout=60)
    assert not errors, errors[:5]
    assert set(seen) == {old, new} and seen[0] == old and seen[-1] == new
    swap = seen.index(new)
    assert set(seen[swap:]) == {new}, "an old answer came after the first new one"
    info = _model_info(http, url)
    assert info["model"]["hash"] == new and info["last_reload"]["ok"]
    assert info["replica"] == replica, "the replica was replaced, not reconfigured in place"

    # A tampered package: refused, named, and the serving model does not change.
    bad = str(packages["tampered"])
    _deploy(_config(packages, {"package": bad}))
    deadline = time.monotonic() + 60
    while (info["last_reload"] or {}).get("package") != bad and time.monotonic() < deadline:
        time.sleep(0.2)
        info = _model_info(http, url)
    assert info["last_reload"]["ok"] is False
    assert "model.safetensors" in info["last_reload"]["error"]
    assert info["model"]["hash"] == new and info["replica"] == replica
    response = _predict(http, url, smears[5])
    assert response.status_code == 200 and response.json()["model"]["hash"] == new
    # Serve shows the application RUNNING with the bad package in its config: readiness does
    # not, so that whoever watches it sees the replica serve another package than deployed.
    ready = http.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["error"] == "swap_refused"
    assert bad in ready.json()["detail"] and str(packages["b"]) in ready.json()["detail"]

    # Putting back the config of the package it serves ends the refusal, without a reload.
    _deploy(_config(packages, {"package": str(packages["b"])}))
    deadline = time.monotonic() + 60
    while (ready := http.get(f"{url}/readyz", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.2)
    info = _model_info(http, url)
    assert ready.json()["model"]["hash"] == new and info["last_reload"]["ok"]
    assert info["replica"] == replica
