"""DP-SGD step time over non-private step time for the same DP-safe model.

resnet18 at 64 px, batch 32, CPU threads as configured; one figure per Opacus grad-sample mode
(`ghost` with fedray's Conv2d ghost norms, see fedray/privacy/ghost_norms.py) and for fedray's
`bk` (book-keeping clipping, one backward; fedray/privacy/bookkeeping.py), for the whole model and
for `model.freeze` (last stage + head trainable). Private and plain steps are timed in
alternation, `--repeats` times, and the median ratio is reported, so a machine whose speed
drifts affects both sides alike. Writes benchmarks/results/dp_overhead.json.

The `patient` rows time patient-level DP-SGD (privacy.unit: patient, fedray/privacy/units.py):
per-record gradients by Opacus' hooks, summed per patient of `--images-per-patient` images,
clipped per patient. Ghost clipping cannot compute a patient's summed-gradient norm, so these
rows are to be read against `hooks` and `ghost`. `--images-per-patient 0` skips them.

`--device cuda` times both sides on a GPU (batches moved there before the timer starts, the
device synchronised before it stops); the noise is then drawn by Opacus on the GPU.

    python benchmarks/dp_overhead.py [--backbone resnet18] [--size 64] [--batch 32] [--steps 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import fedray  # noqa: F401

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedray import engine, privacy
from fedray.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("hooks", "functorch", "ew", "ghost", "bk")


def step_time(model, optimizer, loader, loss_fn, steps: int) -> float:
    """Median seconds per optimizer step, after one warm-up step, on the model's device."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    times = []
    it = iter(loader)
    for i in range(steps + 1):
        x, y = (t.to(device) for t in next(it))
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= 1:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def settings(mode: str) -> privacy.PrivacySettings:
    return privacy.PrivacySettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, budget=None,
                                   sample_rate=0.1, accountant="rdp", poisson_sampling=False,
                                   secure_mode=False, grad_sample_mode=mode)


def patient_settings(records: int, images_per_patient: int,
                     batches: int) -> privacy.PrivacySettings:
    """Grouped clipping over patients of `images_per_patient` records, `batches` per epoch."""
    return dataclasses.replace(settings("hooks"), unit="patient", grouped=True,
                               num_units=records // images_per_patient, sample_rate=1 / batches)


def patient_rows(args, data, loss_fn, result: dict) -> None:
    """Patient-level DP step time against the plain step, for the whole model and frozen."""
    records, k = len(data), args.images_per_patient
    units = torch.arange(records) // k
    for freeze in (False, True):
        key = f"patient{' +freeze' if freeze else ''}"
        model, opt = fresh(args.backbone, freeze, args.device)
        dp_model, dp_opt = fresh(args.backbone, freeze, args.device)
        private = privacy.make_private(
            dp_model, dp_opt, DataLoader(data, batch_size=args.batch),
            patient_settings(records, k, args.steps + 1), loss_fn, unit_ids=units)
        plains, privates = [], []
        for _ in range(args.repeats):
            plains.append(step_time(model, opt, DataLoader(data, batch_size=args.batch), loss_fn,
                                    args.steps))
            privates.append(step_time(private.model, private.optimizer, private.loader,
                                      private.loss_fn or loss_fn, args.steps))
        ratios = sorted(p / q for p, q in zip(privates, plains))
        entry = {"freeze": freeze, "mode": "patient (hooks, grouped)", "images_per_patient": k,
                 "plain_step_s": statistics.median(plains),
                 "dp_step_s": statistics.median(privates),
                 "overhead": statistics.median(ratios), "overhead_runs": ratios}
        result["variants"][key] = entry
        print(f"{key:18s} plain {entry['plain_step_s'] * 1000:6.0f} ms  DP "
              f"{entry['dp_step_s'] * 1000:6.0f} ms  overhead {entry['overhead']:.2f}x "
              f"(runs {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)


def fresh(backbone: str, freeze: bool, device: torch.device):
    torch.manual_seed(0)
    model = build_model(backbone, dp_safe=True, freeze=freeze).to(device)
    return model, engine.make_optimizer(model, 1e-3, 1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--images-per-patient", type=int, default=4)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"),
                        help="cpu, or cuda for the GPU figure")
    parser.add_argument("--output", type=Path, default=RESULTS / "dp_overhead.json")
    args = parser.parse_args()
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(args.threads)
    n = args.batch * (args.steps + 1)
    data = TensorDataset(torch.randn(n, 3, args.size, args.size), torch.randint(0, 4, (n,)))
    loss_fn = torch.nn.CrossEntropyLoss()

    def loader():
        return DataLoader(data, batch_size=args.batch)

    result = {"backbone": args.backbone, "size": args.size, "batch": args.batch,
              "threads": args.threads, "repeats": args.repeats, "device": str(args.device),
              "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
              else None, "variants": {}}
    for freeze in (False, True):
        model, opt = fresh(args.backbone, freeze, args.device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for mode in args.modes:
            key = f"{mode}{' +freeze' if freeze else ''}"
            try:
                dp_model, dp_opt = fresh(args.backbone, freeze, args.device)
                private = privacy.make_private(dp_model, dp_opt, loader(), settings(mode), loss_fn)
            except Exception as exc:  # noqa: BLE001 - a mode this model cannot use is a result
                result["variants"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                print(f"{key}: unavailable ({type(exc).__name__})")
                continue
            plains, privates = [], []
            for _ in range(args.repeats):
                plains.append(step_time(model, opt, loader(), loss_fn, args.steps))
                privates.append(step_time(private.model, private.optimizer, loader(),
                                          private.loss_fn or loss_fn, args.steps))
            ratios = sorted(p / q for p, q in zip(privates, plains))
            entry = {"freeze": freeze, "mode": mode, "trainable_params": trainable,
                     "plain_step_s": statistics.median(plains),
                     "dp_step_s": statistics.median(privates),
                     "overhead": statistics.median(ratios), "overhead_runs": ratios}
            result["variants"][key] = entry
            print(f"{key:18s} plain {entry['plain_step_s'] * 1000:6.0f} ms  DP "
                  f"{entry['dp_step_s'] * 1000:6.0f} ms  overhead {entry['overhead']:.2f}x "
                  f"(runs {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    if args.images_per_patient:
        patient_rows(args, data, loss_fn, result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result["command"] = " ".join(["python", "benchmarks/dp_overhead.py", *sys.argv[1:]])
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
