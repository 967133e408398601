"""How hard the synthetic site smears are: the figures `synth.difficulty` is calibrated on.

Generates hospital sites with `fedray.data.synth.generate_sites` (default: 3 sites, 1500
images at 64 px, difficulty 1), holds out ~30% of each site's patients per class, and reports
balanced accuracy on those held-out patients for

* a centralized smallcnn trained on the pooled training patients of every site,
* the mean-colour baseline (logistic regression on per-image mean RGB), and the same
  features asked for the *site* instead of the class (site shift is in the colour),
* local-only smallcnns, one per site, each scored on its own site's test patients and on
  every other site's (the drop is what site shift costs).

The calibration targets at the default difficulty: centralized 0.80-0.90, mean colour at
most 0.40, local-only models lower on other sites than on their own. Writes
benchmarks/results/synth_calibration.json. A few minutes on 2 CPU cores:

    python benchmarks/synth_calibration.py [--n 1500] [--size 64] [--sites 3] [--epochs 8]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset

from fedray import engine
from fedray.data import synth
from fedray.data.labels import CLASSES
from fedray.data.transforms import eval_preset, train_preset
from fedray.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"centralized": (0.80, 0.90), "mean_colour_max": 0.40}


class _Images(Dataset):
    """uint8 CHW images and labels through a transform preset, one item at a time."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, transform) -> None:  # noqa: ANN001
        self.images, self.labels, self.transform = images, torch.as_tensor(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def decode(table: pa.Table) -> np.ndarray:
    """(N, H, W, 3) uint8 images of a table."""
    return np.stack(
        [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
         for b in table.column("image").to_pylist()]
    )


def patient_split(table: pa.Table, test_share: float, seed: int) -> np.ndarray:
    """Boolean test mask holding out ~``test_share`` of each (site, class)'s patients (>= 1)."""
    patients = np.array(table.column("patient").to_pylist())
    keys = list(zip(table.column("site").to_pylist(), table.column("true_label").to_pylist()))
    by_key: dict[tuple[str, str], set[str]] = {}
    for key, p in zip(keys, patients):
        by_key.setdefault(key, set()).add(p)
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for key in sorted(by_key):
        pool = sorted(by_key[key])
        if len(pool) < 2:
            continue  # a single patient stays in training
        k = max(1, int(round(test_share * len(pool))))
        held.update(rng.choice(pool, size=k, replace=False).tolist())
    return np.isin(patients, sorted(held))


def train_cnn(  # noqa: ANN201
    images: torch.Tensor, labels: np.ndarray, size: int, epochs: int, seed: int
):
    """A smallcnn trained with the project's recipe (AdamW, class-weighted smoothed CE)."""
    torch.manual_seed(seed)
    model = build_model("smallcnn", len(CLASSES), dropout=0.2)
    loader = DataLoader(_Images(images, labels, train_preset(size)), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = engine.make_optimizer(model, lr=0.002, weight_decay=1e-4)
    counts = torch.bincount(torch.as_tensor(labels), minlength=len(CLASSES))
    loss_fn = engine.make_loss(counts, label_smoothing=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for epoch in range(epochs):
        stats = engine.train_one_epoch(model, loader, optimizer, loss_fn, torch.device("cpu"),
                                       grad_clip=1.0)
        scheduler.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {stats.loss:.3f} accuracy {stats.accuracy:.3f} "
              f"({stats.seconds:.0f}s)", file=sys.stderr, flush=True)
    return model


def score(model, images: torch.Tensor, labels: np.ndarray, size: int) -> float:  # noqa: ANN001
    loader = DataLoader(_Images(images, labels, eval_preset(size)), batch_size=128)
    pred = engine.predict(model, loader, torch.device("cpu"))
    return float(balanced_accuracy_score(labels, pred.probs.argmax(1)))


def linear(features: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[train], targets[train])
    return float(balanced_accuracy_score(targets[test], model.predict(features[test])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients-per-class", type=int, default=8)
    parser.add_argument("--difficulty", type=float, default=1.0)
    parser.add_argument("--label-noise", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "synth_calibration.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    table = synth.generate_sites(n=args.n, size=args.size, seed=args.seed, sites=args.sites,
                                 patients_per_class=args.patients_per_class,
                                 difficulty=args.difficulty, label_noise=args.label_noise,
                                 workers=args.threads)
    generate_s = time.perf_counter() - start
    pixels = decode(table)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    labels = np.array([CLASSES.index(c) for c in table.column("label").to_pylist()])
    sites = np.array(table.column("site").to_pylist())
    test = patient_split(table, 0.3, args.seed)
    train = ~test
    names = sorted(set(sites.tolist()))

    mean_rgb = pixels.reshape(len(pixels), -1, 3).mean(axis=1)
    site_index = np.array([names.index(s) for s in sites])
    colour = linear(mean_rgb, labels, train, test)
    colour_site = linear(mean_rgb, site_index, train, test)
    print(f"mean colour: class {colour:.3f}, site {colour_site:.3f}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    central = train_cnn(images[train], labels[train], args.size, args.epochs, args.seed)
    centralized = score(central, images[test], labels[test], args.size)
    per_site_central = {
        s: score(central, images[test & (sites == s)], labels[test & (sites == s)], args.size)
        for s in names
    }
    central_s = time.perf_counter() - start
    print(f"centralized: {centralized:.3f}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    local: dict[str, dict[str, float]] = {}
    for s in names:
        rows = train & (sites == s)
        model = train_cnn(images[rows], labels[rows], args.size, args.epochs, args.seed)
        local[s] = {
            t: score(model, images[test & (sites == t)], labels[test & (sites == t)], args.size)
            for t in names
        }
        print(f"local-only {s}: {local[s]}", file=sys.stderr, flush=True)
    local_s = time.perf_counter() - start
    own = float(np.mean([local[s][s] for s in names]))
    other = float(np.mean([local[s][t] for s in names for t in names if t != s]))

    low, high = TARGETS["centralized"]
    result = {
        "command": "python benchmarks/synth_calibration.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"),
        "generator": {
            "n": args.n, "size": args.size, "sites": args.sites, "seed": args.seed,
            "patients_per_class": args.patients_per_class, "difficulty": args.difficulty,
            "label_noise": args.label_noise,
            "class_mix": {
                s: {c: int(((sites == s) & (labels == i)).sum()) for i, c in enumerate(CLASSES)}
                for s in names
            },
        },
        "split": {"train_images": int(train.sum()), "test_images": int(test.sum()),
                  "test_patients": len(set(np.array(table.column("patient").to_pylist())[test]))},
        "balanced_accuracy": {
            "centralized_smallcnn": round(centralized, 4),
            "centralized_smallcnn_per_site": {s: round(v, 4) for s, v in per_site_central.items()},
            "mean_colour_class": round(colour, 4),
            "mean_colour_site": round(colour_site, 4),
            "local_only": {s: {t: round(v, 4) for t, v in row.items()} for s, row in local.items()},
            "local_only_own_site_mean": round(own, 4),
            "local_only_other_sites_mean": round(other, 4),
            "site_shift_cost": round(own - other, 4),
        },
        "chance": {"class": 1 / len(CLASSES), "site": 1 / len(names)},
        "targets": {
            "centralized_in_range": low <= centralized <= high,
            "mean_colour_at_most_0.40": colour <= TARGETS["mean_colour_max"],
            "local_only_lower_on_other_sites": other < own,
        },
        "training": {"backbone": "smallcnn", "epochs": args.epochs, "batch_size": 32, "lr": 0.002,
                     "schedule": "cosine", "augment": True, "threads": args.threads},
        "seconds": {"generate": round(generate_s, 1), "centralized": round(central_s, 1),
                    "local_only": round(local_s, 1)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.machine()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["balanced_accuracy"], indent=2))
    print(json.dumps(result["targets"]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
