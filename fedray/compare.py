"""Several federated variants (strategies, DP) and a centralized baseline on the same shards,
with one table. The data is split and partitioned once, so the rows differ only in training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from fedray import experiment
from fedray.artifacts import atomic
from fedray.config import ExperimentConfig
from fedray.privacy.totals import total_epsilon

COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "kappa")


def _variant(config: ExperimentConfig, name: str, updates: dict) -> ExperimentConfig:
    data = config.model_dump()
    for dotted, value in updates.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    data["name"] = name
    return ExperimentConfig.model_validate(data)


def variants(config: ExperimentConfig, strategies: list[str], dp: bool) -> dict[str, ExperimentConfig]:
    out = {s: _variant(config, s, {"federation.strategy.name": s}) for s in strategies}
    if dp:
        out["fedavg+dp"] = _variant(config, "fedavg-dp", {
            "federation.strategy.name": "fedavg", "model.dp_safe": True, "privacy.enabled": True})
    return out


def _row(name: str, final: dict, seconds: float, epsilon: float | None) -> dict:
    row = {"variant": name, **{k: final["test"].get(k) for k in COLUMNS}, "seconds": seconds}
    row["epsilon_max"] = epsilon
    return row


def to_markdown(rows: list[dict]) -> str:
    head = "| variant | " + " | ".join(COLUMNS) + " | max epsilon | seconds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        cells = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in COLUMNS]
        eps = f"{r['epsilon_max']:.2f}" if r["epsilon_max"] is not None else "-"
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {eps} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def privacy_total_markdown(total: dict | None) -> str:
    """The hospitals' epsilon over all the runs, below a table of per-run figures."""
    if not total:
        return ""
    lines = ["", "", f"Privacy spent over all {max(h['runs'] for h in total['hospitals'].values())} "
             f"DP runs on these shards ({total['composition']}):", "",
             "| hospital | total epsilon | delta | runs |", "|---|---|---|---|"]
    for name, h in total["hospitals"].items():
        lines.append(f"| {name} | {h['epsilon_total']:.2f} | {h['delta']:.2g} | {h['runs']} |")
    return "\n".join(lines)


def run_comparison(config: ExperimentConfig, strategies: list[str], *, centralized: bool,
                   dp: bool, output_dir: Path, workers: int = 2,
                   log: Callable[[str], None] = print) -> Path:
    """Run every variant; write comparison.json and comparison.md; return the folder."""
    folder = Path(output_dir).resolve() / f"{config.name}-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config.to_yaml())
    shards = experiment.prepare_data(config, folder, log)
    rows, run_dirs = [], []
    for name, variant in variants(config, strategies, dp).items():
        log(f"== {name}")
        result = experiment.run(variant, output_dir=folder / "runs", shards=shards, log=log)
        run_dirs.append(result.run_dir)
        ledgers = (result.final.get("privacy") or {}).get("hospitals") or {}
        eps = [h["epsilon"] for h in ledgers.values() if h.get("epsilon") is not None]
        rows.append(_row(name, result.final, result.seconds, max(eps) if eps else None))
    if centralized:
        from fedray.centralized import run_centralized
        from fedray.runtime import init_ray

        log("== centralized (Ray Train)")
        init_ray(config.runtime)
        final = run_centralized(config, shards, folder / "runs" / "centralized", workers=workers)
        rows.append(_row("centralized", final, final["seconds"], None))
    total = total_epsilon(run_dirs)
    atomic.write_json(folder / "comparison.json", {"variants": rows, "privacy_total": total})
    text = to_markdown(rows) + privacy_total_markdown(total)
    atomic.write_text(folder / "comparison.md", text + "\n")
    log(text)
    return folder
