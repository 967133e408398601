"""HTTP serving throughput vs the same model's in-process batched inference (the compute limit).

For each model (resnet18 at 64 px, and the demo's smallcnn at 64 px; untrained weights, which
time the same as trained ones), a package is exported from a hand-made run folder and measured:
  limit        one process, no Ray or HTTP: preprocess + forward + OOD score of decoded 64 px
               smears in batches of max_batch_size, on the frozen graph the service runs on
               CPU (fedray.artifacts.package.freeze_for_cpu); the better of one pass on every core and
               --streams passes at once on an equal share each (the service may run either)
  batched      16 concurrent HTTP clients, POST /v1/predict (raw PNG), the Serve application of
               fedray.serving in the topology `fedray serve` deploys on CPU (combined: one
               Service deployment, fedray's Batcher in-process, no handle hop), with the
               replicas `fedray serve` starts where it starts Ray (one on every CPU; behind
               HAProxy on 2 or more cores, two on half the CPUs each; --replicas to choose)
  split        the same clients against the split topology (Ingress + Model deployments)
  batch route  the same application and clients, POST /v1/predict/batch with 16 images per
               request (multipart): images per second
  unbatched    the same application with max_batch_size 1: one forward pass per request
  latency      one client, one image at a time: p50 and p99 milliseconds
The batched and batch-route figures are medians of --repeats pairs, each an HTTP window
right after a limit window (--limit-seconds), and their ratios the medians of the pairs': this
machine's speed drifts too much within minutes for a limit taken once to divide them all.
Clients (one asyncio process, keep-alive connections), proxy, Ingress and Model share this
machine's cores, so on a small machine the HTTP figures carry the clients' and the proxy's CPU
too. Writes benchmarks/results/serve.json:
{"models": {name: {"limit_img_s", "batched_img_s", "ratio_batched", "batch_route_img_s",
"ratio_batch_route", "split_batched_img_s", "ratio_split_batched", ...}}, ...}.

    python benchmarks/serve.py [--seconds 10] [--clients 16] [--images-per-request 16]
                               [--models resnet18 smallcnn]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
import torch

import fedray  # noqa: F401  (loopback Ray defaults before Ray is imported)
from fedray.artifacts import checkpoint
from fedray.config import load_config
from fedray.data import synth
from fedray.data.shards import decode_image
from fedray.federation.messages import to_numpy
from fedray.models import build_model
from fedray.artifacts.package import export_package, freeze_for_cpu, load_package

RESULTS = Path(__file__).resolve().parent / "results"


def make_package(root: Path, backbone: str, size: int) -> Path:
    """A package of a freshly initialised model: run folder by hand, then export_package."""
    run = root / f"run_{backbone}"
    run.mkdir(parents=True)
    config = load_config(None, [f"name=bench-{backbone}", f"model.backbone={backbone}",
                                f"data.image_size={size}"])
    (run / "config.yaml").write_text(config.to_yaml())
    torch.manual_seed(0)
    model = build_model(backbone, dropout=config.model.dropout)
    checkpoint.save_weights(to_numpy(model.state_dict()), run / "model.safetensors")
    return export_package(run, root / f"pkg_{backbone}", version="bench", formats=())


def limit_throughput(package_dir: Path, images: list[np.ndarray], batch: int,
                     seconds: float, streams: int = 1) -> float:
    """Images per second of preprocess + forward + OOD score in this process, batches of
    `batch`: `streams` threads each running batches on an equal share of every core."""
    import threading

    cpus = os.cpu_count() or 1
    torch.set_num_threads(max(1, cpus // streams))
    package = freeze_for_cpu(load_package(package_dir))  # the graph the service runs on CPU
    chunk = [images[i % len(images)] for i in range(batch)]
    package.score(package.preprocess(chunk))  # warm-up
    done = [0] * streams
    deadline = time.perf_counter() + seconds

    def stream(k: int) -> None:
        while time.perf_counter() < deadline:
            package.score(package.preprocess(chunk))
            done[k] += batch

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(cpus)
    return sum(done) / (time.perf_counter() - start)


def http_throughput(url: str, bodies: list[bytes], clients: int, seconds: float,
                    per_request: int = 1) -> float:
    """Images per second answered to `clients` concurrent keep-alive connections posting for
    `seconds`: each request one raw PNG (per_request 1) or `per_request` PNGs as multipart
    `files` (/v1/predict/batch).

    The load generator is one asyncio process (aiohttp): it shares this machine's cores with the
    server, and 16 threads of `requests` spent about as much CPU per request as the proxy did.
    """
    import asyncio

    import aiohttp

    async def main() -> tuple[int, list[int], float]:
        done, failures = [0], []
        deadline = time.perf_counter() + seconds

        def payload(i: int):
            if per_request == 1:
                return {"data": bodies[i % len(bodies)], "headers": {"Content-Type": "image/png"}}
            form = aiohttp.FormData()
            for j in range(per_request):
                form.add_field("files", bodies[(i + j) % len(bodies)], filename=f"{j}.png",
                               content_type="image/png")
            return {"data": form}

        async def client(k: int, session: aiohttp.ClientSession) -> None:
            i = k * per_request
            while time.perf_counter() < deadline:
                async with session.post(url, **payload(i)) as r:
                    await r.read()
                    if r.status == 200:
                        done[0] += per_request
                    else:
                        failures.append(r.status)
                i += clients * per_request

        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            start = time.perf_counter()
            await asyncio.gather(*(client(k, session) for k in range(clients)))
            return done[0], failures, time.perf_counter() - start

    count, failures, elapsed = asyncio.run(main())
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests (statuses {sorted(set(failures))})")
    return count / elapsed


def latency_ms(url: str, body: bytes, n: int) -> dict:
    times = []
    with requests.Session() as session:
        for _ in range(n):
            start = time.perf_counter()
            r = session.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=60)
            r.raise_for_status()
            times.append((time.perf_counter() - start) * 1000.0)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def paired(limit: Callable[[], float], served: Callable[[], float], repeats: int) -> dict:
    """`repeats` pairs of (limit window, HTTP window) taken back to back, and the medians.

    This machine's speed drifts by tens of percent within minutes, so a ratio of one limit
    window to an HTTP window taken minutes later measures the drift as much as the service.
    """
    pairs = []
    for _ in range(repeats):
        pairs.append((limit(), served()))
    return {"limit_img_s": statistics.median(l for l, _ in pairs),
            "img_s": statistics.median(g for _, g in pairs),
            "ratio": statistics.median(g / l for l, g in pairs),
            "pairs": [[round(l, 1), round(g, 1)] for l, g in pairs]}


def serve_throughput(package_dir: Path, bodies: list[bytes], args: argparse.Namespace,
                     max_batch_size: int, port: int, latency: bool,
                     topology: str = "combined",
                     limit: Callable[[], float] | None = None) -> dict:
    from ray import serve

    from fedray.serving import local_replicas, parse_args
    from fedray.serving.deployments import application

    serve_args = parse_args({"package": str(package_dir), "device": "cpu",
                             "max_batch_size": max_batch_size, "streams": args.streams,
                             "batch_wait_timeout_s": args.batch_wait_timeout_s,
                             "batch_quiet_s": None if args.batch_quiet_s < 0
                             else args.batch_quiet_s,
                             "topology": topology})
    cpus = os.cpu_count() or 1
    replicas = args.replicas or local_replicas(argparse.Namespace(
        replicas=None, min_replicas=None, max_replicas=None, device="cpu",
        ingress="haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"),
        cpus, topology)
    app = application(serve_args, model_options={
        "ray_actor_options": {"num_cpus": cpus / replicas, "num_gpus": 0},
        "num_replicas": replicas,
        "max_ongoing_requests": max(2 * max_batch_size, 2 * args.clients)})
    serve.run(app, name="bench", route_prefix="/", blocking=False,
              logging_config={"enable_access_log": args.access_log})
    url = f"http://127.0.0.1:{port}/v1/predict"
    out: dict = {"replicas": replicas}
    try:
        http_throughput(url, bodies, args.clients, min(2.0, args.seconds))  # warm-up
        if limit is None:
            out["img_s"] = http_throughput(url, bodies, args.clients, args.seconds)
            return out
        out["single"] = paired(limit, lambda: http_throughput(
            url, bodies, args.clients, args.seconds), args.repeats)
        out["batch_route"] = paired(limit, lambda: http_throughput(
            f"{url}/batch", bodies, args.clients, args.seconds, args.images_per_request),
            args.repeats)
        if latency:
            out.update(latency_ms(url, bodies[0], args.latency_requests))
    finally:
        serve.delete("bench")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "smallcnn"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput measurement")
    parser.add_argument("--limit-seconds", type=float, default=3.0,
                        help="per limit window, one before each paired HTTP window")
    parser.add_argument("--repeats", type=int, default=3,
                        help="(limit, HTTP) pairs per figure; ratios are their medians")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--batch-quiet-s", type=float, default=0.002,
                        help="the service's batch_quiet_s (a negative value: none)")
    parser.add_argument("--streams", type=int, default=None,
                        help="the service's compute streams (default: the service's own, 2 on "
                             "a CPU); the limit is the better of 1 stream and max(2, this)")
    parser.add_argument("--replicas", type=int, default=None,
                        help="service replicas, each on an equal share of the CPUs (default: "
                             "as `fedray serve` starts them, fedray.serving.local_replicas)")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--images-per-request", type=int, default=16,
                        help="images in each POST /v1/predict/batch (at most max_batch_images)")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="Serve's per-request access log lines (on, as `fedray serve` "
                             "runs; off measured no faster)")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment for Ray and Serve, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
                             "(set before the local Ray starts; recorded in the output)")
    parser.add_argument("--note", default=None, help="how to read these figures (recorded)")
    parser.add_argument("--output", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()
    for pair in args.env:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--env takes KEY=VALUE, got {pair!r}")
        os.environ[key] = value
    from fedray.serving import use_fast_path

    environment = use_fast_path()  # `fedray serve`'s default; an --env above overrides it

    import ray
    from ray import serve

    table = synth.generate(n=64, size=args.size, seed=1)
    bodies = table.column("image").to_pylist()
    images = [decode_image(b, args.size) for b in bodies]
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus + 2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for backbone in args.models:
                package = make_package(Path(tmp), backbone, args.size)
                # The limit is the better in-process arrangement: one pass on every thread,
                # or `streams` single-share passes at once (what the service may run).
                streams = max(2, args.streams or 2)  # whatever the service runs
                one_stream = limit_throughput(package, images, args.max_batch_size, args.seconds)
                many = limit_throughput(package, images, args.max_batch_size, args.seconds,
                                        streams) if streams > 1 else 0.0
                best = streams if many > one_stream else 1

                def limit() -> float:
                    return limit_throughput(package, images, args.max_batch_size,
                                            args.limit_seconds, best)

                batched = serve_throughput(package, bodies, args, args.max_batch_size, port,
                                           latency=True, limit=limit)
                single, route = batched["single"], batched["batch_route"]
                limit_img_s = single["limit_img_s"]
                unbatched = serve_throughput(package, bodies, args, 1, port, latency=False)
                split = serve_throughput(package, bodies, args, args.max_batch_size, port,
                                         latency=False, topology="split")
                row = {"limit_img_s": limit_img_s, "limit_streams": best,
                       "replicas": batched["replicas"], "split_replicas": split["replicas"],
                       "limit_one_stream_img_s": one_stream,
                       f"limit_{streams}_streams_img_s": many,
                       "batched_img_s": single["img_s"],
                       "ratio_batched": single["ratio"],
                       "batched_pairs": single["pairs"],
                       "batch_route_img_s": route["img_s"],
                       "ratio_batch_route": route["ratio"],
                       "batch_route_pairs": route["pairs"],
                       "unbatched_img_s": unbatched["img_s"],
                       "ratio_unbatched": unbatched["img_s"] / limit_img_s,
                       "split_batched_img_s": split["img_s"],
                       "ratio_split_batched": split["img_s"] / limit_img_s,
                       "p50_ms": batched["p50_ms"], "p99_ms": batched["p99_ms"]}
                results[f"{backbone}_{args.size}px"] = row
                print(f"{backbone} {args.size}px: limit {limit_img_s:.0f} img/s; HTTP batched "
                      f"{row['batched_img_s']:.0f} img/s ({row['ratio_batched']:.2f}x), unbatched "
                      f"{row['unbatched_img_s']:.0f} img/s ({row['ratio_unbatched']:.2f}x), "
                      f"/v1/predict/batch x{args.images_per_request} "
                      f"{row['batch_route_img_s']:.0f} img/s ({row['ratio_batch_route']:.2f}x); "
                      f"split topology {row['split_batched_img_s']:.0f} img/s "
                      f"({row['ratio_split_batched']:.2f}x); "
                      f"one image p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms")
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"models": results,
              "workload": {k: v for k, v in vars(args).items() if k in (
                  "size", "clients", "seconds", "limit_seconds", "repeats", "max_batch_size",
                  "batch_wait_timeout_s", "batch_quiet_s", "streams", "replicas",
                  "latency_requests", "images_per_request", "access_log", "env")},
              "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
              "serve_environment": environment,
              "cpus": cpus, "machine": platform.machine(), "torch": torch.__version__}
    if args.note:
        result["note"] = args.note
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
