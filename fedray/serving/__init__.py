"""Serving a model package over HTTP with Ray Serve: the application's arguments and `fedray serve`.

Two deployments make the application (fedray.serving.deployments): "Ingress" parses, checks and
decodes uploads and answers in JSON; "Model" holds the package, batches requests dynamically and
swaps packages in place when its user_config names another one. This module stays light (pydantic
only): the CLI parser and the argument model (fedray.serving.args) must not pull in Ray or torch.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedray.serving.args import EXPLAIN_METHODS, ServeArgs, auth_token, parse_args

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["EXPLAIN_METHODS", "ServeArgs", "add_cli", "auth_token", "build_app", "parse_args"]


def build_app(args: dict) -> Application:
    """The Serve application for `args` (the import path serve config files name)."""
    from fedray.serving.deployments import application

    return application(parse_args(args))


# --------------------------------------------------------------------------- command line


def add_cli(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a model package over HTTP (Ray Serve)")
    serve.add_argument("package", help="package folder, file:// or s3:// URI (fedray export)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0: all interfaces)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    serve.add_argument("--runtime", choices=["pytorch", "torchscript"], default="pytorch")
    serve.add_argument("--max-batch-size", type=int, default=16)
    serve.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    serve.add_argument("--batch-quiet-s", type=float, default=0.002,
                       help="a partial batch goes once no request has arrived for this long")
    serve.add_argument("--request-timeout-s", type=float, default=30.0,
                       help="answer 504 to a request not done within this many seconds")
    serve.add_argument("--min-image-side", type=int, default=32,
                       help="refuse images with a shorter side (422 image_too_small)")
    serve.add_argument("--replicas", type=int,
                       help="fixed number of Model replicas (default 1; 2 with --ingress "
                            "haproxy on a CPU of 2 or more cores, see local_replicas)")
    serve.add_argument("--min-replicas", type=int, help="autoscale Model replicas from this ...")
    serve.add_argument("--max-replicas", type=int, help="... to this")
    serve.add_argument("--model-cpus", type=float, default=None,
                       help="CPUs per Model replica, which sets its torch threads (default: "
                            "where this command starts Ray, its CPUs shared by the replicas; "
                            "on a running cluster, 1)")
    serve.add_argument("--auth-token-env", metavar="VAR",
                       help="require `Authorization: Bearer $VAR` on /v1; refuse to start "
                            "while VAR is unset or empty")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="with --auth-token-env: serve /v1 open when VAR is unset or empty")
    serve.add_argument("--topology", choices=["auto", "split", "combined"], default="auto",
                       help="combined: one deployment does HTTP and the model (fastest on CPU); "
                            "split: Ingress + Model; auto: split with --device cuda, else "
                            "combined")
    serve.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy",
                       help="what takes HTTP connections: Serve's Python proxy (default), or "
                            "Serve's HAProxy ingress, about twice the images per second on "
                            "a small CPU machine, which also listens on every interface for "
                            "its stats (8404) and metrics (9101); only where this command "
                            "starts Ray")
    serve.add_argument("--name", default="fedray", help="Serve application name")
    serve.add_argument("--route-prefix", default="/", help="the application's HTTP path prefix")
    serve.add_argument("--blocking", action=argparse.BooleanOptionalAction, default=True,
                       help="keep serving until Ctrl-C, then delete the application "
                            "(--no-blocking: deploy and return)")
    serve.set_defaults(func=cmd_serve)


def topology(args: argparse.Namespace) -> str:
    """`--topology auto`: one combined deployment unless the model gets a GPU of its own."""
    if args.topology != "auto":
        return args.topology
    return "split" if args.device == "cuda" else "combined"


def _model_scaling(args: argparse.Namespace) -> dict:
    """Deployment options for Model replicas from the CLI flags."""
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    if autoscale and args.replicas is not None:
        raise ValueError("give --replicas or --min-replicas/--max-replicas, not both")
    options: dict = {"ray_actor_options": {"num_cpus": model_cpus(args, None),
                                           "num_gpus": 1 if args.device == "cuda" else 0}}
    if autoscale:
        low = args.min_replicas if args.min_replicas is not None else 1
        high = args.max_replicas if args.max_replicas is not None else max(low, 1)
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"need 0 <= --min-replicas <= --max-replicas >= 1, got {low}, {high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": args.max_batch_size}
    else:
        replicas = 1 if args.replicas is None else args.replicas
        if replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {replicas}")
        options["num_replicas"] = replicas
    return options


def local_replicas(args: argparse.Namespace, local_cpus: float, topology: str) -> int | None:
    """Model replicas where this command starts Ray and no replica flag was given (None where
    one was): two with the HAProxy ingress on a CPU of 2 or more cores in the combined
    topology, else one.

    Behind HAProxy each combined replica takes HTTP on its own event loop, and one loop's
    per-request work, run one request after another while a cohort of one-image requests
    comes back, bounds the images per second. Two replicas of half the CPUs each run two
    loops at once, and their batches of 8 on one thread each do more images per second than
    one batch of 16 on both (benchmarks/results/serve_haproxy.json: 16 one-image clients on
    2 cores). Through Serve's Python proxy the proxy is the bound, and two replicas gained
    nothing, so the default stays one there."""
    if any(getattr(args, flag) is not None for flag in ("replicas", "min_replicas",
                                                       "max_replicas")):
        return None
    cpu = args.device != "cuda"
    return 2 if args.ingress == "haproxy" and cpu and topology == "combined" \
        and local_cpus >= 2 else 1


def model_cpus(args: argparse.Namespace, local_cpus: float | None, split: bool = False,
               replicas: int | None = None) -> float:
    """CPUs per Model replica: --model-cpus, else, on a Ray of `local_cpus` CPUs that this
    command started, an equal share for each replica (`replicas`, else at most --replicas or
    --max-replicas of them) of those CPUs, less one for the Ingress in the split topology;
    else 1. Ray gives a replica as many torch threads as whole CPUs."""
    if args.model_cpus is not None:
        if args.model_cpus <= 0:
            raise ValueError(f"--model-cpus must be > 0, got {args.model_cpus}")
        return args.model_cpus
    if local_cpus is None:
        return 1.0
    replicas = replicas or args.replicas or args.max_replicas or 1
    return float(max(1, (int(local_cpus) - (1 if split else 0)) // replicas))


def proxy_timeout_s(args: ServeArgs) -> float:
    """The Serve proxy's request_timeout_s for an application with these args."""
    return args.request_timeout_s + 5.0


# Ray Serve's own fast path, on by default where fedray starts Ray: buffered request logs, no
# extra thread or event loop per request, gRPC between Serve's actors, and each replica's own
# HTTP server (bound to loopback, like the proxy). A replica opens its internal gRPC server on
# all interfaces in either mode (Ray 2.60; token-authenticated), so this adds no exposure.
# An explicit RAY_SERVE_THROUGHPUT_OPTIMIZED=0 in the environment turns it off.
# A replica with its own HTTP server stays open at least RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_
# PERIOD_S (30 s by default) when it stops, so that outside load balancers can deregister it:
# `fedray serve` took 30 s to stop after Ctrl-C. Where fedray starts Ray, the only routers in
# front (the proxy, HAProxy) are that Ray's own and stop with it, so 1 s is enough; the drain
# still waits for requests in flight.
FAST_PATH_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def use_fast_path(ingress: str = "proxy") -> dict[str, str]:
    """Set Serve's fast-path environment (unless set already) for the Ray this process is
    about to start and for Serve's modules, which read it once, at import; returns what holds.

    `ingress="haproxy"` adds Serve's HAProxy ingress (Ray 2.60): HAProxy takes the HTTP port
    and forwards to each replica's own HTTP server. Its files (config, admin socket, server
    state), which Serve keeps under /tmp/haproxy-serve unless told otherwise, go to a folder of
    this process's own (mode 0700), so no other user or Serve instance can read or replace
    them, and the folder is removed when this process exits. It is not the default: Ray binds
    HAProxy's stats (8404) and metrics (9101) ports on every interface, which a NetworkPolicy
    confines on Kubernetes (k8s/base/rayservice.yaml turns it on there) but nothing confines
    on a plain machine. A variable already set in the environment is kept.
    """
    if ingress not in ("proxy", "haproxy"):
        raise ValueError(f"ingress must be proxy or haproxy, got {ingress!r}")
    wanted = dict(FAST_PATH_ENV)
    if ingress == "haproxy":
        import tempfile

        files = tempfile.mkdtemp(prefix="fedray-haproxy-")  # mode 0700
        # registered before Ray starts, so it runs after Ray's own shutdown at exit
        atexit.register(shutil.rmtree, files, ignore_errors=True)
        wanted.update({
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(files, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(files, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": files,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(files, "server-state")})
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in wanted}


def local_uri(package: str) -> str:
    """`package` with a local path made absolute: replicas may run in another folder."""
    if "://" in package:
        return package
    return str(Path(package).expanduser().resolve())


def cmd_serve(args: argparse.Namespace) -> int:
    from fedray.artifacts.package import verify_package

    serve_args = parse_args({
        "package": local_uri(args.package), "device": args.device, "runtime": args.runtime,
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "batch_quiet_s": args.batch_quiet_s, "auth_token_env": args.auth_token_env,
        "allow_unauthenticated": args.allow_unauthenticated,
        "request_timeout_s": args.request_timeout_s, "min_image_side": args.min_image_side,
        "topology": topology(args)})
    model_options = _model_scaling(args)
    card = verify_package(serve_args.package)  # a bad package fails here, before Ray starts

    import ray

    starts_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if args.ingress == "haproxy" and not starts_ray:
        raise ValueError(
            "--ingress haproxy needs a Ray that this command starts (Serve reads it when Ray "
            "starts); on a running cluster, start its nodes with RAY_SERVE_ENABLE_HA_PROXY=1 "
            "(k8s/base/rayservice.yaml does) and leave --ingress at proxy")
    if starts_ray:
        used = use_fast_path(args.ingress)  # before Serve is imported and Ray started
        if args.ingress == "haproxy":
            print("warning: --ingress haproxy: Serve's HAProxy listens on every interface for "
                  "its stats (8404) and metrics (9101), whatever --host says; its files are "
                  f"in {used['RAY_SERVE_HAPROXY_SERVER_STATE_BASE']}", file=sys.stderr)
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from fedray.serving.deployments import application

    if starts_ray:
        auth_token(serve_args)  # replicas inherit this environment: fail before Ray starts
        ray.init(include_dashboard=False, configure_logging=False)
        cpus = ray.cluster_resources().get("CPU", 1)
        replicas = local_replicas(args, cpus, serve_args.topology)
        if replicas is not None:
            model_options["num_replicas"] = replicas
        model_options["ray_actor_options"]["num_cpus"] = model_cpus(
            args, cpus, split=serve_args.topology == "split", replicas=replicas)
    elif not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"])
    from fedray.federation import hosts

    hosts.forget_idle()  # the replicas need the CPUs that idle hospital hosts of this driver hold
    before = serve.status()
    serve_was_running = bool(before.proxies or before.applications)
    # Serve's proxy ends a request after its own request_timeout_s (408): a backstop a little
    # past the Ingress's deadline, which answers first with a JSON 504.
    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": proxy_timeout_s(serve_args)})
    try:
        serve.run(application(serve_args, model_options=model_options), name=args.name,
                  route_prefix=args.route_prefix, blocking=False)
    except (RuntimeError, RayServeException) as exc:  # it did not deploy; Serve says why
        _stop(args.name, stop_serve=not serve_was_running)
        raise ValueError(f"Serve could not deploy {args.name!r}: {exc}") from None
    url = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
    print(f"serving {card['name']} {card['version']} ({card['model']['backbone']}) at {url}")
    print(f"  API docs {url}/docs; try: curl -F file=@smear.png {url}/v1/predict")
    if not args.blocking:
        return 0
    try:
        wait_for_interrupt()
    except KeyboardInterrupt:
        print(f"deleting the Serve application {args.name!r}")
    finally:
        _stop(args.name, stop_serve=not serve_was_running)
    return 0


def wait_for_interrupt() -> None:
    """Block until Ctrl-C, or SIGTERM (a process manager's stop), both as KeyboardInterrupt,
    so the application is deleted and a local Ray is shut down either way."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    while True:
        time.sleep(3600)


def _stop(name: str, *, stop_serve: bool) -> None:
    """Delete this command's application; stop Serve too if this command started it and no
    other application runs there (a Ray this command started ends with it anyway)."""
    from ray import serve

    serve.delete(name)
    if stop_serve and not serve.status().applications:
        serve.shutdown()
