"""A CPU forward pass beside a Python-busy thread: the eager model against the frozen graph.

A Serve replica runs its model in a thread of the process whose event loop parses HTTP. An
eager PyTorch forward pass releases the GIL inside each operator and takes it back after,
so beside a thread that keeps the GIL busy it waits for that thread at every operator. A
frozen TorchScript graph (fedray.artifacts.package.freeze_for_cpu) runs its operators in
C++ with the GIL released for the whole call. This times one pass (resnet18, untrained,
--size px, --batch images, one intra-op thread) in four settings:
  alone            nothing else runs in the process
  beside busy      a second thread runs pure-Python work the whole time
and the same beside busy with sys.setswitchinterval(--switch-ms) for the eager model (how
often the busy thread is asked to hand the GIL over). Median milliseconds over --passes.
Writes benchmarks/results/gil_convoy.json.

    python benchmarks/gil_convoy.py [--batch 8] [--size 64] [--passes 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import make_package  # noqa: E402  (the same package the serving benchmark times)

from fedray.artifacts.package import freeze_for_cpu, load_package  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(forward, x: torch.Tensor, passes: int) -> float:
    forward(x)  # warm-up
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        forward(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def beside_busy(forward, x: torch.Tensor, passes: int) -> float:
    stop = threading.Event()

    def busy() -> None:
        n = 0
        while not stop.is_set():
            for i in range(1000):
                n += i * i

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        return median_ms(forward, x, passes)
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--switch-ms", type=float, default=0.5)
    parser.add_argument("--output", type=Path, default=RESULTS / "gil_convoy.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        package = load_package(make_package(Path(tmp), "resnet18", args.size))
        frozen = freeze_for_cpu(package)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, 3, args.size, args.size),
                                             dtype=np.float32))

    def eager(t):
        with torch.no_grad():
            return package.model(t)

    def graph(t):
        with torch.no_grad():
            return frozen.model(t)

    default_switch = sys.getswitchinterval()
    result = {"eager_alone_ms": median_ms(eager, x, args.passes),
              "eager_beside_busy_ms": beside_busy(eager, x, args.passes)}
    sys.setswitchinterval(args.switch_ms / 1e3)
    try:
        result["eager_beside_busy_switch_ms"] = beside_busy(eager, x, args.passes)
    finally:
        sys.setswitchinterval(default_switch)
    result["frozen_alone_ms"] = median_ms(graph, x, args.passes)
    result["frozen_beside_busy_ms"] = beside_busy(graph, x, args.passes)
    result.update({
        "workload": {"model": "resnet18", "image_size": args.size, "batch": args.batch,
                     "threads": 1, "passes": args.passes, "switch_ms": args.switch_ms,
                     "default_switch_ms": default_switch * 1e3},
        "command": " ".join(["python benchmarks/gil_convoy.py", *sys.argv[1:]]),
        "machine": platform.machine(), "torch": torch.__version__,
    })
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
