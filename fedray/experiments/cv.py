"""k-fold cross-validation of a federated run (and optionally the centralized baseline).

The source is loaded once and cut into `folds` stratified, group-aware folds by whole split
units (patient + duplicate images). Fold k is the test set of round k of the protocol
(so `data.split.test` is replaced by 1/folds); the validation split, `data.split.val` of all
images, is carved from the other folds and the rest is partitioned among the hospitals as usual. Every image is tested exactly once, and a patient never sits on two sides.

Layout of the output folder:

    <output_dir>/<name>-cv<folds>-<stamp>/
        config.yaml, cv.json, cv.md
        fold_<k>/data/          shards of fold k (shards.json, fold.json, *.parquet)
        fold_<k>/runs/<run>/    the federated run
        fold_<k>/runs/centralized/   the Ray Train baseline (with centralized=True)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedray.experiments import experiment
from fedray.artifacts import atomic
from fedray.artifacts import run_folder as rf
from fedray.experiments.compare import privacy_total_markdown
from fedray.config import ExperimentConfig
from fedray.data.pipeline import build_shards, counts_table, load_source
from fedray.data.split import assign_fold_splits
from fedray.privacy.totals import total_epsilon

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "kappa")
ARMS = ("federated", "centralized")


def summarize(per_fold: list[dict]) -> tuple[dict, dict, dict]:
    """Mean, standard deviation and count per metric over folds, with numpy.

    The standard deviation is the sample one (ddof=1) whenever at least two folds have the
    metric; a metric missing in a fold (None, e.g. ROC-AUC with a class absent) is left out.
    """
    mean, std, count = {}, {}, {}
    for key in METRICS:
        values = np.asarray([f[key] for f in per_fold if f.get(key) is not None], dtype=float)
        count[key] = int(values.size)
        mean[key] = float(np.mean(values)) if values.size else None
        std[key] = float(np.std(values, ddof=1 if values.size > 1 else 0)) if values.size else None
    return mean, std, count


def _arm(per_fold: list[dict]) -> dict:
    mean, std, count = summarize(per_fold)
    return {"per_fold": per_fold, "mean": mean, "std": std, "n": count}


def _fold_row(fold: int, final: dict, seconds: float, run_dir: Path, root: Path) -> dict:
    test = final["test"]
    row = {"fold": fold, **{k: test.get(k) for k in METRICS}, "n_test": test.get("n"),
           "seconds": seconds, "run_dir": str(run_dir.relative_to(root))}
    return row


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {std:.3f}"


def to_markdown(result: dict) -> str:
    """Metric rows; federated and centralized mean ± std, then one column per fold and arm."""
    folds = result["folds"]
    arms = [a for a in ARMS if result.get(a)]
    head = ["metric"] + [f"{a} mean ± std" for a in ARMS]
    head += [f"fold {k} {a[:3]}" for k in range(folds) for a in arms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in METRICS:
        cells = [key]
        for a in ARMS:
            r = result.get(a)
            cells.append(_cell(r["mean"][key], r["std"][key]) if r else "-")
        for k in range(folds):
            for a in arms:
                rows = [f for f in result[a]["per_fold"] if f["fold"] == k]
                v = rows[0][key] if rows else None
                cells.append("-" if v is None else f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    done = len(result["federated"]["per_fold"])
    note = (f"\n{folds}-fold cross-validation (stratified, group-aware; every image tested once), "
            f"{done}/{folds} folds done, seed {result['seed']}. Test-set metrics; mean ± sample "
            f"standard deviation over folds (numpy, ddof=1; ddof=0 when only one fold has a "
            f"value). `fed` = federated, `cen` = centralized (Ray Train).")
    return "\n".join(lines) + "\n" + note


def run_cv(config: ExperimentConfig, *, folds: int = 5, centralized: bool = False,
           output_dir: Path, workers: int = 2,
           log: Callable[[str], None] = print) -> Path:
    """Run the federated experiment (and the centralized baseline) on each of `folds` folds.

    Writes cv.json and cv.md (rewritten after every fold, so a stopped run keeps what it
    finished) and returns the folder.
    """
    from fedray.federation import hosts

    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    base = Path(output_dir).resolve() / f"{config.name}-cv{folds}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, suffix = base, 1
    while folder.exists():
        suffix += 1
        folder = base.with_name(f"{base.name}-{suffix}")
    folder.mkdir(parents=True)
    atomic.write_text(folder / rf.CONFIG, config.to_yaml())

    start = time.perf_counter()
    table = load_source(config.data, config.seed)
    log(f"cv: {table.num_rows} images from '{config.data.source}' loaded in "
        f"{time.perf_counter() - start:.1f}s; {folds} folds")
    sp = config.data.split
    result: dict = {"folds": folds, "seed": config.seed, "metrics": list(METRICS),
                    "std_ddof": 1, "n_images": table.num_rows, "fold_sizes": [],
                    "federated": _arm([]), "centralized": _arm([]) if centralized else None}
    fed_rows: list[dict] = []
    cen_rows: list[dict] = []
    run_dirs: list[Path] = []
    with hosts.reusing():  # the folds' runs start their hospitals' processes once
        for k in range(folds):
            log(f"== fold {k + 1}/{folds}")
            fold_dir = folder / f"fold_{k}"
            splits = assign_fold_splits(table, folds=folds, fold=k, val=sp.val, seed=config.seed,
                                        group_aware=sp.group_aware)
            shards = build_shards(table, config.data, config.federation.hospitals, config.seed,
                                  fold_dir / rf.DATA, splits=splits)
            sizes = {s: int(np.sum(splits == s)) for s in ("train", "val", "test")}
            (fold_dir / rf.DATA / "fold.json").write_text(json.dumps(
                {"folds": folds, "fold": k, "seed": config.seed, **sizes}, indent=2))
            result["fold_sizes"].append({"fold": k, **sizes})
            log(counts_table(shards))

            run = experiment.run(config, output_dir=fold_dir / "runs", shards=shards, log=log)
            fed_rows.append(_fold_row(k, run.final, run.seconds, run.run_dir, folder))
            result["federated"] = _arm(fed_rows)
            run_dirs.append(run.run_dir)
            result["privacy_total"] = total_epsilon(run_dirs)
            if centralized:
                from fedray.experiments.centralized import run_centralized
                from fedray.federation.runtime import init_ray

                log(f"== fold {k + 1}/{folds}: centralized (Ray Train)")
                init_ray(config.runtime)
                cen_dir = fold_dir / "runs" / "centralized"
                final = run_centralized(config, shards, cen_dir, workers=workers)
                cen_rows.append(_fold_row(k, final, final["seconds"], cen_dir, folder))
                result["centralized"] = _arm(cen_rows)
            _write(folder, result)
    log(to_markdown(result))
    return folder


def _write(folder: Path, result: dict) -> None:
    atomic.write_json(folder / "cv.json", result)
    atomic.write_text(folder / "cv.md", to_markdown(result)
                      + privacy_total_markdown(result.get("privacy_total")) + "\n")
