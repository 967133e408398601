"""The first paper's recipe, in its shape, on one GPU end to end, and `fedray serve` of its model.

  recipe  `fedray data synth` (--n smears at --size px, whole patients per class folder), then
          one whole `fedray train` process, as users run it: configs/paper-fedavg-resnet50.yaml
          on those images with an untrained backbone (no weights are downloaded), its 4
          hospitals as actors on fractional GPUs of one device (--gpu-fraction each), bf16 AMP
          and channels_last (the config's), 10 rounds x 5 local epochs. Recorded: the process's
          wall time, the run's time to its first round, and each round's time (fit + aggregate
          + evaluate, from the run's metrics.jsonl)
  limit   the run's exported package in this process on the device: preprocess + forward + OOD
          score of decoded smears in batches of --max-batch-size (images per second)
  serve   `fedray serve PACKAGE --device cuda` in a process of its own, as users run it: one
          client posting one image at a time (p50, p99 ms), then --clients concurrent clients
          posting one image per request (images per second, and its ratio to the limit)

    python benchmarks/gpu_recipe.py [--output benchmarks/results/gpu_recipe.json]

--device cpu with a small workload (--n 240 --size 64 --backbone smallcnn --rounds 2
--local-epochs 1 --gpu-fraction 0) checks the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent))  # benchmarks/serve.py's package, port and clients
ROOT = Path(__file__).resolve().parent.parent
FEDRAY = [sys.executable, "-m", "fedray.cli"]


def timed(cmd: list[str], log: Path, timeout: float) -> float:
    """Run `cmd` (output to `log`), fail on a non-zero exit or at `timeout` (stopping it as
    Ctrl-C does); its wall seconds."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise TimeoutError(f"fedray {cmd[3]} stopped at its {timeout:.0f}s limit")
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} exited {code} after {seconds:.0f}s; "
                           f"the end of {log.name}:\n" + "".join(log.read_text().splitlines(
                               keepends=True)[-30:]))
    return seconds


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to `proc`'s process group (a run or service shuts its Ray down), then SIGTERM
    (where Ctrl-C is ignored, as in a shell's background job), then kill."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def rounds_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recipe(args: argparse.Namespace, work: Path, result: dict) -> Path:
    """The run; its figures go into result["recipe"] as they come (a run stopped at its time
    limit keeps the rounds it finished)."""
    data = work / "data"
    synth_s = timed(FEDRAY + ["data", "synth", "--output", str(data), "--n", str(args.n),
                              "--size", str(args.size), "--workers", str(args.synth_workers)],
                    work / "synth.log", args.timeout)
    overrides = ["data.source=folder", f"data.path={data}", f"data.image_size={args.size}",
                 f"model.backbone={args.backbone}", "model.pretrained=false",
                 f"federation.hospitals={args.hospitals}", f"federation.rounds={args.rounds}",
                 f"training.local_epochs={args.local_epochs}",
                 f"runtime.hospital_num_gpus={args.gpu_fraction}",
                 f"runtime.hospital_num_cpus={args.hospital_cpus}",
                 f"runtime.device={args.device}", *args.set]
    cmd = FEDRAY + ["train", "--config", str(args.config), "--output-dir", str(work / "runs")]
    for kv in overrides:
        cmd += ["--set", kv]
    out = result["recipe"] = {
        "command": "fedray train " + " ".join(cmd[len(FEDRAY) + 1:]).replace(str(work), "WORK"),
        "synth_s": synth_s}
    try:
        out["wall_s"] = timed(cmd, work / "train.log", args.train_timeout)
    finally:
        runs = list((work / "runs").glob("*/metrics.jsonl"))
        if runs:
            summarise(runs[0].parent, args, out)
    return runs[0].parent


def summarise(run_dir: Path, args: argparse.Namespace, out: dict) -> None:
    rounds = rounds_of(run_dir)
    per_round = [r["timings"]["fit_s"] + r["timings"]["aggregate_s"] + r["timings"]["evaluate_s"]
                 for r in rounds]
    startup_file, final_file = run_dir / "startup.json", run_dir / "metrics.json"
    startup = json.loads(startup_file.read_text()) if startup_file.is_file() else {}
    final = json.loads(final_file.read_text()) if final_file.is_file() else {}
    fits = [[h["seconds"] for h in r["hospitals"].values() if "seconds" in h] for r in rounds]
    hospital_fit = [max(f) for f in fits if f]  # rounds where some hospital trained
    train_rows = rounds[0]["num_samples"] if rounds else 0  # every hospital's training split
    out.update({"rounds_run": len(rounds),
           "to_first_round_s": startup.get("to_first_round_s"),
           "process_to_first_round_s": startup.get("process_to_first_round_s"),
           "round_s": per_round, "round_s_mean": sum(per_round) / max(1, len(per_round)),
           "slowest_hospital_fit_s": hospital_fit,
           "train_images": train_rows or None,
           "test": {k: v for k, v in (final.get("test") or {}).items()
                    if k in ("accuracy", "balanced_accuracy", "macro_f1")},
           "stop_reason": final.get("stop_reason")})
    if train_rows and hospital_fit:  # images trained on per second of the rounds' fit phase
        out["train_images_per_s"] = train_rows * args.local_epochs * len(hospital_fit) / sum(
            hospital_fit)


def limit(package_dir: Path, args: argparse.Namespace, bodies: list[bytes]) -> float:
    import torch

    from fedray.artifacts.package import freeze_for_cpu, load_package
    from fedray.data.shards import decode_image

    package = load_package(package_dir, device=args.device)
    if args.device == "cpu":
        package = freeze_for_cpu(package)  # the graph the service runs on a CPU
    images = [decode_image(b, args.size) for b in bodies]
    chunk = [images[i % len(images)] for i in range(args.max_batch_size)]
    for _ in range(3):  # warm-up (cuDNN picks its algorithms)
        package.score(package.preprocess(chunk))[0].cpu()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        package.score(package.preprocess(chunk))[0].cpu()
        done += len(chunk)
    elapsed = time.perf_counter() - start
    del package
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return done / elapsed


def serving(package_dir: Path, args: argparse.Namespace, bodies: list[bytes], work: Path) -> dict:
    import requests

    from serve import _free_port, http_throughput, latency_ms

    port = _free_port()
    cmd = FEDRAY + ["serve", str(package_dir), "--device", args.device, "--port", str(port),
                    "--max-batch-size", str(args.max_batch_size)]
    log = (work / "serve.log").open("w")
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"fedray serve exited {server.returncode}:\n"
                                   + (work / "serve.log").read_text()[-3000:])
            if time.perf_counter() - start > args.timeout:
                raise RuntimeError(f"fedray serve not ready after {args.timeout:.0f}s")
            try:
                if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)  # polling a server that is starting; no race is won by it
        ready_s = time.perf_counter() - start
        url = f"{base}/v1/predict"
        latency_ms(url, bodies[0], 20)  # warm-up
        low = latency_ms(url, bodies[0], args.latency_requests)
        http_throughput(url, bodies, args.clients, 2.0)  # warm-up
        img_s = http_throughput(url, bodies, args.clients, args.seconds)
        return {"command": f"fedray serve PACKAGE --device {args.device} --max-batch-size "
                           f"{args.max_batch_size}",
                "ready_s": ready_s, "p50_ms": low["p50_ms"], "p99_ms": low["p99_ms"],
                "clients": args.clients, "img_s": img_s}
    finally:
        stop(server)  # Ctrl-C: delete the application, stop its Ray
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/paper-fedavg-resnet50.yaml"),
                        help="relative to the checkout")
    parser.add_argument("--n", type=int, default=3256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--gpu-fraction", type=float, default=0.25, help="GPU per hospital")
    parser.add_argument("--hospital-cpus", type=float, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--synth-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more config overrides for the run")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput window")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for each step but the run")
    parser.add_argument("--train-timeout", type=float, default=3600.0,
                        help="seconds for the run; one stopped keeps its finished rounds")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the work folder (data, run, package, logs) here")
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu_recipe.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch

    result = {"command": "python benchmarks/gpu_recipe.py " + " ".join(sys.argv[1:]),
              "workload": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("output", "keep", "timeout", "train_timeout", "config")},
              "config": str(args.config),
              "device": (torch.cuda.get_device_name(0) if args.device == "cuda"
                         else platform.processor() or platform.machine()),
              "cpus": os.cpu_count(), "torch": torch.__version__}
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.output.write_text(json.dumps(result, indent=2))

    work = args.keep or Path(tempfile.mkdtemp(prefix="fedray-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    errors = result["errors"] = {}
    package_dir = work / "package"
    try:
        run_dir = recipe(args, work, result)
        timed(FEDRAY + ["export", str(run_dir), "--output", str(package_dir), "--format", "none"],
              work / "export.log", args.timeout)
        result["package"] = "the run's"
    except Exception as exc:  # noqa: BLE001  (recorded; serving is timed on fresh weights)
        errors["recipe"] = f"{type(exc).__name__}: {exc}"
        from serve import make_package  # an untrained package times as a trained one

        package_dir = make_package(work / "fresh", args.backbone, args.size)
        result["package"] = "fresh weights (the run did not finish)"
    save()
    print("recipe:", json.dumps(result.get("recipe")), flush=True)
    from fedray.data import synth

    bodies = synth.generate(n=64, size=args.size, seed=1).column("image").to_pylist()
    try:
        result["limit_img_s"] = limit(package_dir, args, bodies)
        print(f"limit: {result['limit_img_s']:.0f} img/s", flush=True)
        result["serve"] = serving(package_dir, args, bodies, work)
        result["serve"]["ratio"] = result["serve"]["img_s"] / result["limit_img_s"]
        print("serve:", json.dumps(result["serve"]), flush=True)
    except Exception as exc:  # noqa: BLE001
        errors["serve"] = f"{type(exc).__name__}: {exc}"
    save()
    if errors:
        print("errors:", json.dumps(errors, indent=1), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
