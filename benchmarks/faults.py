"""Cost of losing a hospital: a run with one hospital killed in round 2 vs a clean run.

Target: the faulty run takes at most one round-time longer than the clean one (the killed
hospital is restarted by Ray and rejoins the next round with its own state). Writes
benchmarks/results/faults.json.

    python benchmarks/faults.py [--rounds 4] [--hospitals 4] [--backbone smallcnn]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import fedray  # noqa: F401  (loopback Ray defaults before Ray is imported)

import ray

from fedray.federation import runtime
from fedray.config import load_config
from fedray.federation.coordinator import Coordinator
from fedray.data.pipeline import build_shards, load_source

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(config, shards, run_dir: Path, kill_in_round: int | None) -> dict:
    run_dir.mkdir(parents=True)
    pool = runtime.RayPool(config, shards, run_dir)
    pool.wait_ready()
    coord = Coordinator(config, run_dir, pool, shards)
    rounds, start = [], time.perf_counter()
    try:
        while True:
            killer = None
            if kill_in_round is not None and coord.round + 1 == kill_in_round:
                victim = pool.process(pool.names[-1])
                killer = threading.Timer(2.0, lambda: ray.kill(victim, no_restart=False))
                killer.start()
            record = coord.run_round()
            if killer:
                killer.join()
            if record is None:
                break
            rounds.append({k: record[k] for k in ("round", "completed", "failures", "timings")})
        return {"seconds": time.perf_counter() - start, "rounds": rounds}
    finally:
        pool.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--output", type=Path, default=RESULTS / "faults.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = load_config(None, [
            f"model.backbone={args.backbone}", "data.image_size=64", "data.synth.n=2000",
            f"federation.hospitals={args.hospitals}", f"federation.rounds={args.rounds}",
            "federation.min_clients=1", "training.early_stopping_patience=null",
            "runtime.max_restarts=2"])
        shards = build_shards(load_source(config.data, 0), config.data, args.hospitals, 0,
                              root / "data")
        runtime.init_ray(config.runtime)
        clean = one_run(config, shards, root / "clean", None)
        faulty = one_run(config, shards, root / "faulty", kill_in_round=2)
        ray.shutdown()
    round_time = clean["seconds"] / args.rounds
    extra = faulty["seconds"] - clean["seconds"]
    result = {"clean_s": clean["seconds"], "faulty_s": faulty["seconds"],
              "round_s": round_time, "extra_rounds": extra / round_time,
              "faulty_failures": [r["failures"] for r in faulty["rounds"]],
              "workload": vars(args) | {"output": None}}
    print(f"clean {clean['seconds']:.1f}s, one hospital killed in round 2: "
          f"{faulty['seconds']:.1f}s ({result['extra_rounds']:+.2f} round-times)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result["command"] = " ".join(["python", "benchmarks/faults.py", *sys.argv[1:]])
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
