"""DP-SGD step time over non-private step time for the same DP-safe model.

resnet18 at 64 px, batch 32, CPU threads as configured; one figure per Opacus grad-sample mode.
Writes benchmarks/results/dp_overhead.json.

    python benchmarks/dp_overhead.py [--backbone resnet18] [--size 64] [--batch 32] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import fedray  # noqa: F401

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedray import engine
from fedray.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"


def step_time(model, optimizer, loader, loss_fn, steps: int) -> float:
    """Seconds per optimizer step, after two warm-up steps."""
    times = []
    it = iter(loader)
    for i in range(steps + 2):
        x, y = next(it)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from opacus import PrivacyEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", type=Path, default=RESULTS / "dp_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch * (args.steps + 2)
    data = TensorDataset(torch.randn(n, 3, args.size, args.size), torch.randint(0, 4, (n,)))
    loss_fn = torch.nn.CrossEntropyLoss()

    torch.manual_seed(0)
    model = build_model(args.backbone, dp_safe=True)
    opt = engine.make_optimizer(model, 1e-3, 1e-4)
    plain = step_time(model, opt, DataLoader(data, batch_size=args.batch), loss_fn, args.steps)
    result = {"backbone": args.backbone, "size": args.size, "batch": args.batch,
              "threads": args.threads, "plain_step_s": plain, "modes": {}}
    print(f"non-private step: {plain * 1000:.0f} ms")
    for mode in ("hooks", "functorch", "ew"):
        torch.manual_seed(0)
        model = build_model(args.backbone, dp_safe=True)
        opt = engine.make_optimizer(model, 1e-3, 1e-4)
        try:
            dp_model, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=args.batch),
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                grad_sample_mode=mode)
            t = step_time(dp_model, dp_opt, DataLoader(data, batch_size=args.batch), loss_fn,
                          args.steps)
            result["modes"][mode] = {"step_s": t, "overhead": t / plain}
            print(f"DP-SGD ({mode}): {t * 1000:.0f} ms, {t / plain:.2f}x")
        except Exception as exc:  # noqa: BLE001 - a mode this model cannot use is a result
            result["modes"][mode] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"DP-SGD ({mode}): unavailable ({type(exc).__name__})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
