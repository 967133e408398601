"""Several runs side by side: final test metrics and overlaid validation curves."""

from __future__ import annotations

from pathlib import Path
from fedray.report.document import Block, Figure, Section, Table, Text, _fmt, _write
from fedray.report.figures import _figure, _round_axis, _rounds, _save
from fedray.report.run import Run




def _unique_names(runs: list[Run]) -> list[str]:
    """Run folder names, prefixed with their parent where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.dir.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


COMPARE_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "kappa")


def compare_table(runs: list[Run], names: list[str]) -> Table:
    rows = []
    for run, name in zip(runs, names):
        test = run.final.get("test", {})
        c = run.config
        rows.append([name, c.model.backbone, c.federation.strategy.name,
                     str(c.federation.hospitals), c.data.partition.scheme, str(len(run.records)),
                     _fmt(run.final.get("best_round")), *(_fmt(test.get(k)) for k in COMPARE_KEYS)])
    return Table(["run", "backbone", "strategy", "hospitals", "partition", "rounds", "best round",
                  *(f"test {k}" for k in COMPARE_KEYS)], rows)


def plot_compare(runs: list[Run], names: list[str], path: Path) -> Figure:
    fig = _figure(12, 4)
    axes = fig.subplots(1, 3)
    for run, name in zip(runs, names):
        with_val = [r for r in run.records if r.get("val")]
        for ax, key in zip(axes, ("loss", "accuracy", "balanced_accuracy")):
            ax.plot(_rounds(with_val), [r["val"][key] for r in with_val], marker="o", label=name)
    for ax, key in zip(axes, ("loss", "accuracy", "balanced_accuracy")):
        ax.set_title(f"validation {key.replace('_', ' ')}")
        _round_axis(ax)
    axes[0].legend(fontsize="small")
    return _save(fig, path, "Global validation curves of every run, overlaid")


def compare_runs(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Side-by-side final test metrics and overlaid validation curves of several runs.

    Reads only config, metrics.json and metrics.jsonl (no model is run), so it is quick even
    for many large runs; test metrics are the ones recorded when each run finished.
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run folder")
    runs = [Run.load(Path(d)) for d in run_dirs]
    names = _unique_names(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unfinished = [n for n, r in zip(names, runs) if not r.final]
    blocks: list[Block] = [compare_table(runs, names),
                           plot_compare(runs, names, out / "compare_curves.png")]
    if unfinished:
        blocks.append(Text(f"Not finished (no metrics.json, no test metrics): "
                           f"{', '.join(unfinished)}.", alert=True))
    return _write(out, "compare", f"fedray comparison of {len(runs)} runs",
                  [Section("Runs side by side", blocks)])
