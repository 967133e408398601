"""Arms of a federated comparison over the same hospital sites, each repeated over seeds.

Arms: aggregation strategies, FedAvg with DP-SGD in every hospital, a pooled Ray Train
baseline (a simulation: it reads every site folder) and each hospital trained alone. Every arm
uses the same backbone, optimiser (AdamW at training.lr) and budget (rounds x local epochs);
all arms of one seed see the same local splits, and by default every seed sees them too: fixed
per-centre test sets, as in FLamby, with a seed varying initialisation, order, augmentation and
noise (`resplit` also redraws the splits). A non-site config is first divided into site
folders (`split_sites`, the simulation tool) under the comparison folder, so there is one path.
Intervals: by default 95% percentile bootstrap intervals over seeds and test images
(fedray.experiments.bootstrap), with the Student t interval over seeds beside them; `interval`
"t" makes the t interval the one reported.
"""

from __future__ import annotations

import json
import math
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedray.experiments import experiment
from fedray.artifacts import atomic, checkpoint
from fedray.config import ExperimentConfig, load_config
from fedray.privacy.totals import total_epsilon

INTERVALS = {
    "bootstrap": ("95% percentile bootstrap over seeds and test images (fedray.experiments."
                  "bootstrap: seeds drawn with replacement, each site's test images redrawn "
                  "within each true class from its confusion matrix, 2000 replicates; images "
                  "of a patient redrawn as independent); ci95_t: Student t over seeds"),
    "t": "t-based 95% interval over seeds (Student t, n-1 dof)",
}
DP_EPSILON = 8.0
METRICS = {"test_balanced_accuracy": "balanced_accuracy", "test_macro_f1": "macro_f1",
           "roc_auc_macro": "roc_auc_macro"}
SUMMARY = ("test_balanced_accuracy", "worst_site_balanced_accuracy", "test_macro_f1",
           "roc_auc_macro")
LOCAL_ONLY = "local-only"
SEEDS_FILE = "seeds.json"  # every arm's per-seed scores and confusion matrices
CENTRALIZED = "centralized"


def _variant(config: ExperimentConfig, name: str, updates: dict) -> ExperimentConfig:
    return load_config(config.model_dump(mode="json"), {**updates, "name": name})


def site_config(config: ExperimentConfig, folder: Path,
                log: Callable[[str], None] = print) -> ExperimentConfig:
    """The config in site mode: as given (site folders made absolute), or with its data divided
    into one site folder per hospital under `folder` (by data.partition, patients together)."""
    if config.data.source == "sites":  # folders named as absolute paths, as each run records
        return _variant(config, config.name, {
            f"data.sites.{h}.path": str(Path(site.path).expanduser().resolve())
            for h, site in config.data.sites.items()})
    from fedray.data.pipeline import load_source
    from fedray.data.sites import split_sites

    table = load_source(config.data, config.seed)
    folders = split_sites(table, config.data, config.federation.hospitals, config.seed, folder)
    log(f"data: {table.num_rows} images from '{config.data.source}' divided into "
        f"{len(folders)} site folders ({config.data.partition.scheme} partition)")
    data = config.model_dump(mode="json")
    data["data"].update(source="sites", path=None,
                        sites={h: {"path": str(p.resolve())} for h, p in folders.items()})
    return load_config(data)


def _strategy(config: ExperimentConfig, name: str) -> dict:
    """Overrides making strategy `name` the arm's: the config may carry the parameters of every
    strategy compared (mu, server_lr, ...); each arm keeps only those its strategy takes."""
    from fedray.strategy import strategy_params

    takes = set(strategy_params(name))
    given = config.federation.strategy.params()
    return {"federation.strategy.name": name,
            **{f"federation.strategy.{k}": None for k in given if k not in takes}}


def variants(config: ExperimentConfig, strategies: list[str], dp: bool,
             dp_epsilon: float | None = None) -> dict[str, ExperimentConfig]:
    """The federated arms: one per strategy, and FedAvg with DP-SGD at a target epsilon
    (`dp_epsilon`, else privacy.target_epsilon, else 8; the noise solved for the planned
    rounds x local epochs) when `dp`."""
    out = {s: _variant(config, s, _strategy(config, s)) for s in strategies}
    if dp:
        out["fedavg+dp"] = _variant(config, "fedavg-dp", {
            **_strategy(config, "fedavg"), "model.dp_safe": True, "privacy.enabled": True,
            "privacy.target_epsilon": dp_epsilon or config.privacy.target_epsilon or DP_EPSILON})
    return out


def local_config(config: ExperimentConfig, hospital: str) -> ExperimentConfig:
    """A federation of one: only `hospital`'s site, the same budget and recipe."""
    return _variant(config, f"local-{hospital}", {
        "data.sites": {hospital: config.data.sites[hospital].model_dump(mode="json")},
        "federation.hospitals": 1, "federation.min_clients": 1, **_strategy(config, "fedavg")})


def seeded(config: ExperimentConfig, seed: int, resplit: bool = False,
           name: str | None = None) -> ExperimentConfig:
    """`config` at `seed`. The sites' splits stay those of the comparison's own split seed
    (data.split.seed, else its seed): a seed varies initialisation, data order, augmentation and
    noise, every arm and seed is scored on the same test patients. `resplit` makes each seed
    also draw its own split (the interval then includes which patients were held out)."""
    split_seed = seed if resplit else (config.data.split.seed if config.data.split.seed
                                       is not None else config.seed)
    return _variant(config, name or config.name, {"seed": seed, "data.split.seed": split_seed})


def t_interval(values: list[float]) -> dict:
    """Mean and t-based 95% interval (Student t, n-1 dof); one value gives [value, value]."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "ci95": [None, None], "values": [], "n": 0}
    mean = float(np.mean(xs))
    out = {"mean": mean, "ci95": [mean, mean], "values": xs, "n": len(xs)}
    if len(xs) == 1:
        out["single_seed"] = True  # no spread to estimate: the interval is the value
        return out
    half = float(stats.t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs)))
    out["ci95"] = [mean - half, mean + half]
    return out


def _scores(final: dict) -> dict:
    """One seed of a pooled or federated arm, from its metrics.json."""
    test = final["test"]
    out = {k: test.get(m) for k, m in METRICS.items()}
    out["worst_site_balanced_accuracy"] = (final.get("worst_site") or {}).get("balanced_accuracy")
    out["sites"] = {h: m["test"]["balanced_accuracy"]
                    for h, m in sorted((final.get("sites") or {}).items()) if "test" in m}
    cms = {h: m["test"].get("confusion_matrix")
           for h, m in sorted((final.get("sites") or {}).items()) if "test" in m}
    if cms and all(cm is not None for cm in cms.values()):
        out["cms"] = {"global": cms}  # what the bootstrap redraws
    return out


def _local_scores(at_sites: dict[str, dict[str, dict]]) -> dict:
    """One seed of local-only: `at_sites[h]` is hospital h's own model scored at every site
    (evaluate_at_sites). Pooled scores are averaged over hospitals; `sites[s]` is the mean over
    hospitals of their model at site s; own/other split it by whose site it is."""
    hospitals = sorted(at_sites)
    sites = sorted(s for s in at_sites[hospitals[0]] if s != "pooled")
    out = {k: float(np.mean([at_sites[h]["pooled"][m] for h in hospitals]))
           for k, m in METRICS.items()}
    out["worst_site_balanced_accuracy"] = float(np.mean(
        [min(at_sites[h][s]["balanced_accuracy"] for s in sites) for h in hospitals]))
    out["sites"] = {s: float(np.mean([at_sites[h][s]["balanced_accuracy"] for h in hospitals]))
                    for s in sites}
    out["own_site_balanced_accuracy"] = float(np.mean(
        [at_sites[h][h]["balanced_accuracy"] for h in hospitals]))
    others = [at_sites[h][s]["balanced_accuracy"] for h in hospitals for s in sites if s != h]
    out["other_site_balanced_accuracy"] = float(np.mean(others)) if others else None
    out["by_hospital"] = {h: {s: at_sites[h][s]["balanced_accuracy"] for s in sites}
                          for h in hospitals}
    out["cms"] = {h: {s: at_sites[h][s]["confusion_matrix"] for s in sites} for h in hospitals}
    return out


def summarize(seeds: list[dict], interval: str = "t") -> dict:
    """An arm's seeds as intervals (and per-site means). `interval` "bootstrap": the scores the
    confusion matrices give take bootstrap intervals (ci95) with the t interval beside them
    (ci95_t); the others (ROC-AUC) and any arm without matrices keep the t interval."""
    skip = ("sites", "by_hospital", "seconds", "epsilon_max", "cms")
    keys = [k for k in seeds[0] if k not in skip]
    out = {k: {**t_interval([s[k] for s in seeds]), "interval": "t"} for k in keys}
    if interval == "bootstrap" and all("cms" in s for s in seeds):
        from fedray.experiments import bootstrap

        for key, ci in bootstrap.intervals([s["cms"] for s in seeds]).items():
            if key in out and out[key]["mean"] is not None:
                out[key].update(ci95_t=out[key]["ci95"], ci95=ci, interval="bootstrap")
    out["sites"] = {h: float(np.mean([s["sites"][h] for s in seeds])) for h in seeds[0]["sites"]}
    if "by_hospital" in seeds[0]:
        first = seeds[0]["by_hospital"]
        out["by_hospital"] = {h: {s: float(np.mean([x["by_hospital"][h][s] for x in seeds]))
                                  for s in first[h]} for h in first}
    seconds = [s["seconds"] for s in seeds if s.get("seconds") is not None]
    out["seconds"] = float(np.mean(seconds)) if seconds else None
    eps = [s["epsilon_max"] for s in seeds if s.get("epsilon_max") is not None]
    out["epsilon_max"] = max(eps) if eps else None
    return out


def budget(config: ExperimentConfig, seeds: list[int], dp: dict | None,
           resplit: bool = False, interval: str = "bootstrap") -> dict:
    t, f = config.training, config.federation
    split_seed = config.data.split.seed if config.data.split.seed is not None else config.seed
    return {"rounds": f.rounds, "local_epochs": t.local_epochs,
            "epochs": f.rounds * t.local_epochs, "optimizer": "AdamW", "lr": t.lr,
            "weight_decay": t.weight_decay, "batch_size": t.batch_size,
            "backbone": config.model.backbone, "image_size": config.data.image_size,
            "sites": sorted(config.data.sites), "seeds": seeds, "dp": dp,
            "split_seed": "each seed's own" if resplit else split_seed, "interval": interval,
            "seeds_vary": ("initialisation, data order, augmentation, DP noise and the local "
                           "splits" if resplit else "initialisation, data order, augmentation "
                           "and DP noise; every seed is scored on the same local test splits"),
            "note": "every arm: same optimiser, lr and rounds x local epochs; a seed's local "
                    "splits are shared by all arms; centralized trains on the union of the "
                    "sites' local train splits (a simulation: the driver reads every site)"}


def _fmt(summary: dict) -> str:
    if summary.get("mean") is None:
        return "-"
    lo, hi = summary["ci95"]
    flag = "*" if summary.get("single_seed") and summary.get("interval") == "t" else ""
    return f"{summary['mean']:.3f} [{lo:.3f}, {hi:.3f}]{flag}"


def to_markdown(arms: dict[str, dict], budget_: dict) -> str:
    sites = sorted({s for a in arms.values() for s in a["sites"]})
    head = ("| arm | test balanced accuracy | worst site | macro F1 | ROC-AUC | "
            + " | ".join(sites) + " | max epsilon | seconds/seed |")
    lines = [head, "|" + "---|" * (7 + len(sites))]
    for name, a in arms.items():
        cells = [_fmt(a[k]) for k in SUMMARY] + [f"{a['sites'][s]:.3f}" if s in a["sites"]
                                                 else "-" for s in sites]
        eps = f"{a['epsilon_max']:.2f}" if a.get("epsilon_max") is not None else "-"
        secs = f"{a['seconds']:.0f}" if a.get("seconds") is not None else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {eps} | {secs} |")
    method = budget_.get("interval", "t")
    lines += ["", f"Mean [95% interval] over seeds {budget_['seeds']}: {INTERVALS[method]}"
              + ("; ROC-AUC: Student t over seeds" if method == "bootstrap" else "")
              + ("; * one seed: no t interval." if len(budget_["seeds"]) == 1 else ".")]
    lines.append(f"Budget for every arm: {budget_['rounds']} rounds x {budget_['local_epochs']} "
                 f"local epochs, AdamW lr {budget_['lr']:g}, batch {budget_['batch_size']}, "
                 f"{budget_['backbone']} at {budget_['image_size']} px.")
    if LOCAL_ONLY in arms:
        a = arms[LOCAL_ONLY]
        lines.append(f"local-only: each hospital's own model, pooled over all sites and averaged "
                     f"over hospitals; at its own site {_fmt(a['own_site_balanced_accuracy'])}, "
                     f"at the other sites {_fmt(a['other_site_balanced_accuracy'])} "
                     "(the site-shift cost).")
    if budget_.get("dp"):
        d = budget_["dp"]
        lines.append(f"fedavg+dp: DP-SGD in every hospital at target epsilon "
                     f"{d['target_epsilon']:g} (per hospital, {d['unit']}-level).")
    return "\n".join(lines)


def privacy_total_markdown(total: dict | None) -> str:
    """The hospitals' epsilon over all the runs, below a table of per-run figures."""
    if not total:
        return ""
    lines = ["", "", f"Privacy spent over all {max(h['runs'] for h in total['hospitals'].values())} "
             f"DP runs on these sites ({total['composition']}):", "",
             "| hospital | total epsilon | delta | runs |", "|---|---|---|---|"]
    for name, h in total["hospitals"].items():
        lines.append(f"| {name} | {h['epsilon_total']:.2f} | {h['delta']:.2g} | {h['runs']} |")
    return "\n".join(lines)


def plot(arms: dict[str, dict], path: Path) -> None:
    """Bars: pooled test balanced accuracy with 95% intervals; dots: per-site means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    means = [arms[n]["test_balanced_accuracy"]["mean"] or 0.0 for n in names]
    lo = [m - (arms[n]["test_balanced_accuracy"]["ci95"][0] or m) for n, m in zip(names, means)]
    hi = [(arms[n]["test_balanced_accuracy"]["ci95"][1] or m) - m for n, m in zip(names, means)]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    x = np.arange(len(names))
    ax.bar(x, means, yerr=[lo, hi], capsize=4, color="#9ecae1", label="pooled test (95% CI)")
    sites = sorted({s for a in arms.values() for s in a["sites"]})
    for k, site in enumerate(sites):
        ys = [arms[n]["sites"].get(site) for n in names]
        ax.scatter(x + (k - (len(sites) - 1) / 2) * 0.12, ys, s=18, zorder=3, label=site)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("balanced accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _epsilon(final: dict) -> float | None:
    ledgers = (final.get("privacy") or {}).get("hospitals") or {}
    eps = [h["epsilon"] for h in ledgers.values() if h.get("epsilon") is not None]
    return max(eps) if eps else None


def _local_only(config: ExperimentConfig, runs: Path, folder: Path,
                log: Callable[[str], None]) -> dict:
    at_sites, seconds = {}, 0.0
    for hospital in sorted(config.data.sites):
        result = experiment.run(local_config(config, hospital), output_dir=runs, log=log)
        weights = checkpoint.load_weights(result.run_dir / "model.safetensors")
        at_sites[hospital] = experiment.evaluate_at_sites(config, weights, "test", work_dir=folder)
        atomic.write_json(result.run_dir / "at_sites.json", at_sites[hospital])
        seconds += result.seconds
    return {**_local_scores(at_sites), "seconds": seconds}


def run_comparison(config: ExperimentConfig, strategies: list[str], *, centralized: bool,
                   dp: bool, output_dir: Path, workers: int = 2, local_only: bool = False,
                   seeds: int = 1, dp_epsilon: float | None = None, resplit: bool = False,
                   interval: str = "bootstrap",
                   log: Callable[[str], None] = print) -> Path:
    """Run every arm `seeds` times; write comparison.json, .md and .png; return the folder.
    The files are rewritten after every seed, so a stopped comparison keeps what it finished."""
    from fedray.federation import hosts

    folder = Path(output_dir).resolve() / f"{config.name}-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config.to_yaml())
    config = site_config(config, folder / "sites", log)
    federated = variants(config, strategies, dp, dp_epsilon)
    seed_list = [config.seed + i for i in range(seeds)]
    dp_info = None
    if dp:
        p = federated["fedavg+dp"].privacy
        dp_info = {"mechanism": "DP-SGD in every hospital (Opacus), FedAvg aggregation",
                   "target_epsilon": p.target_epsilon, "unit": p.unit}
    if interval not in INTERVALS:
        raise ValueError(f"interval {interval!r} is not one of {sorted(INTERVALS)}")
    plan = budget(config, seed_list, dp_info, resplit, interval)
    per_seed: dict[str, list[dict]] = {}
    failed: dict[str, list[str]] = {}
    dp_dirs: list[Path] = []

    def attempt(name: str, seed: int, arm: Callable[[], dict]) -> None:
        log(f"== {name} (seed {seed})")
        try:
            per_seed.setdefault(name, []).append(arm())
        except Exception as exc:  # noqa: BLE001 - a failed arm is recorded, the others still run
            failed.setdefault(name, []).append(f"seed {seed}: {type(exc).__name__}: {exc}")
            log(f"{name} (seed {seed}) failed:\n{traceback.format_exc()}")
            if not per_seed[name]:
                del per_seed[name]

    def federated_arm(name: str, variant: ExperimentConfig, seed: int) -> dict:
        arm = seeded(variant, seed, resplit, name=f"{variant.name}-s{seed}")
        result = experiment.run(arm, output_dir=folder / "runs" / name, log=log)
        if arm.privacy.enabled:
            dp_dirs.append(result.run_dir)
        return {**_scores(result.final), "seconds": result.seconds,
                "epsilon_max": _epsilon(result.final)}

    def centralized_arm(arm: ExperimentConfig, seed: int) -> dict:
        from fedray.experiments.centralized import run_centralized_sites
        from fedray.federation.runtime import init_ray

        init_ray(config.runtime)
        final = run_centralized_sites(arm, folder / "runs" / CENTRALIZED / f"s{seed}",
                                      workers=workers)
        return {**_scores(final), "seconds": final["seconds"]}

    with hosts.reusing():  # the arms' runs start their hospitals' processes once
        for k, seed in enumerate(seed_list):
            for name, variant in federated.items():
                attempt(name, seed, lambda: federated_arm(name, variant, seed))
            at_seed = seeded(config, seed, resplit)
            if centralized:
                attempt(CENTRALIZED, seed, lambda: centralized_arm(at_seed, seed))
            if local_only:
                attempt(LOCAL_ONLY, seed, lambda: _local_only(
                    at_seed, folder / "runs" / LOCAL_ONLY / f"s{seed}", folder, log))
            _write(folder, per_seed, {**plan, "seeds": seed_list[:k + 1]}, dp_dirs, failed,
                   log=None)
    return _write(folder, per_seed, plan, dp_dirs, failed, log=log)


def _write(folder: Path, per_seed: dict[str, list[dict]], plan: dict, dp_dirs: list[Path],
           failed: dict[str, list[str]], log: Callable[[str], None] | None) -> Path:
    method = plan.get("interval", "t")
    atomic.write_json(folder / SEEDS_FILE, per_seed)
    arms = {name: summarize(seeds, method) for name, seeds in per_seed.items()}
    total = total_epsilon(dp_dirs)
    atomic.write_json(folder / "comparison.json", {
        "arms": arms, "budget": plan, "interval": INTERVALS[method], "privacy_total": total,
        "failed": failed})
    text = to_markdown(arms, plan) + privacy_total_markdown(total)
    if failed:
        text += "\n\nFailed: " + "; ".join(f"{n} ({e})" for n, errs in failed.items() for e in errs)
    atomic.write_text(folder / "comparison.md", text + "\n")
    plot(arms, folder / "comparison.png")
    if log:
        log(text)
    return folder


def resummarize(folder: Path, interval: str, log: Callable[[str], None] = print) -> Path:
    """Rewrite a comparison folder's comparison.json/.md/.png with `interval`, from its
    seeds.json, or from its run folders when an older comparison wrote none."""
    folder = Path(folder)
    if interval not in INTERVALS:
        raise ValueError(f"interval {interval!r} is not one of {sorted(INTERVALS)}")
    previous = json.loads((folder / "comparison.json").read_text())
    if (folder / SEEDS_FILE).is_file():
        per_seed = json.loads((folder / SEEDS_FILE).read_text())
    else:  # an older comparison: rebuilt from its runs, each arm's mean seconds carried over
        per_seed = _seeds_from_runs(folder / "runs")
        for name, seeds in per_seed.items():
            for scores in seeds:
                scores["seconds"] = (previous["arms"].get(name) or {}).get("seconds")
    known = [n for n in previous["arms"] if n in per_seed]
    per_seed = {n: per_seed[n] for n in known + [n for n in per_seed if n not in known]}
    dp_dirs = [p.parent for p in sorted((folder / "runs").glob("*/*/metrics.json"))
               if ((json.loads(p.read_text()).get("privacy") or {}).get("dp_sgd"))]
    first = (previous["budget"].get("seeds") or [0])[0]
    plan = {**previous["budget"], "interval": interval,
            "seeds": [first + i for i in range(max(map(len, per_seed.values()), default=0))],
            "seeds_per_arm": {name: len(seeds) for name, seeds in per_seed.items()}}
    return _write(folder, per_seed, plan, dp_dirs, previous.get("failed") or {}, log=log)


def _seeds_from_runs(runs: Path) -> dict[str, list[dict]]:
    """Per-seed scores from a comparison's run folders (seconds unknown: None)."""
    def seed_of(name: str) -> int:
        match = re.search(r"-s(\d+)-\d{8}-\d{6}$", name) or re.fullmatch(r"s(\d+)", name)
        if not match:
            raise ValueError(f"{runs}: cannot tell the seed of run folder {name!r}")
        return int(match.group(1))

    out: dict[str, list[dict]] = {}
    for arm in sorted(p for p in runs.iterdir() if p.is_dir()):
        found = []
        for run in sorted(p for p in arm.iterdir() if p.is_dir()):
            if arm.name == LOCAL_ONLY:
                at_sites = {}
                for local in sorted(run.iterdir()):
                    if (local / "at_sites.json").is_file():
                        hospital = next(iter(json.loads(
                            (local / "data" / "sites.json").read_text())["sites"]))
                        at_sites[hospital] = json.loads((local / "at_sites.json").read_text())
                if at_sites:
                    found.append((seed_of(run.name), {**_local_scores(at_sites), "seconds": None}))
            elif (run / "metrics.json").is_file():
                final = json.loads((run / "metrics.json").read_text())
                found.append((seed_of(run.name), {**_scores(final), "seconds": None,
                                                  "epsilon_max": _epsilon(final)}))
        if found:
            out[arm.name] = [scores for _, scores in sorted(found, key=lambda x: x[0])]
    order = [n for n in out if n not in (CENTRALIZED, LOCAL_ONLY)]
    return {n: out[n] for n in order + [CENTRALIZED, LOCAL_ONLY] if n in out}
