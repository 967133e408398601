"""A DP-SGD hospital round against a non-private one, through `fedray train` as users run it.

The workload of benchmarks/federation.py (synthetic 64 px images, resnet18, 1 local epoch of
batch 32 a round), with the model DP-safe (GroupNorm) on both sides, so that the only
difference is privacy: `privacy.enabled` with a fixed noise multiplier, in the default
grad-sample mode or the one given. Each side is one whole `fedray train` process; the figure is
the hospitals' fit time per round (metrics.jsonl `timings.fit_s`), the first round left out
(warm-up), and the whole process's wall time beside it.

Writes benchmarks/results/dp_round.json ({"plain_fit_s", "dp_fit_s", "ratio", ...}).

    python benchmarks/dp_round.py [--hospitals 2] [--per-hospital 256] [--rounds 3]
                                  [--grad-sample-mode bk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from federation import (RESULTS, WORKLOAD, add_workload_args, run_fedray,  # noqa: E402
                        write_config, write_dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser, hospitals=2, per_hospital=256)
    parser.add_argument("--grad-sample-mode", default=None,
                        help="privacy.grad_sample_mode (default: the config default)")
    parser.add_argument("--output", type=Path, default=RESULTS / "dp_round.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is warm-up)")
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = args.hospitals * args.per_hospital * 3 // 2
        data = write_dataset(root / "prepared", n, args.size)
        for side in ("plain", "dp"):
            path = write_config(root / f"{side}.yaml", data, root / f"runs-{side}", args)
            config = yaml.safe_load(path.read_text())
            config["model"]["dp_safe"] = True
            if side == "dp":
                config["privacy"] = {"enabled": True, "noise_multiplier": 1.0,
                                     "max_grad_norm": 1.0}
                if args.grad_sample_mode:
                    config["privacy"]["grad_sample_mode"] = args.grad_sample_mode
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            out = run_fedray(path, RESULTS / f"dp_round-{side}.log")
            fits = out["fedray_fit_s_per_round"]
            sides[side] = {"process_s": out["fedray_s"], "fit_s_per_round": fits,
                           "fit_s": statistics.mean(fits[1:])}
            if side == "dp":
                sides[side]["epsilon_max"] = out["fedray_epsilon_max"]
            print(f"{side}: fit {sides[side]['fit_s']:.2f}s a round (rounds 2..), "
                  f"process {out['fedray_s']:.1f}s")
    result = {"plain_fit_s": sides["plain"]["fit_s"], "dp_fit_s": sides["dp"]["fit_s"],
              "ratio": sides["dp"]["fit_s"] / sides["plain"]["fit_s"],
              "process_ratio": sides["dp"]["process_s"] / sides["plain"]["process_s"],
              "sides": sides, "grad_sample_mode": args.grad_sample_mode or "default",
              "workload": {k: v for k, v in vars(args).items() if k in WORKLOAD},
              "command": "python benchmarks/dp_round.py " + " ".join(sys.argv[1:]),
              "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "machine": platform.machine()}
    print(f"DP round / plain round: {result['ratio']:.2f}x")
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
