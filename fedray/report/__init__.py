"""A run report: one self-contained HTML file and a Markdown summary, from a run folder alone.

Why a report and not just metrics.json: a federated run can look fine on its headline numbers
and still be wrong in ways only a picture or a cross-check shows: a hospital whose local model
does not transfer, a round dominated by one slow site, a test image that also sits in a training
shard, or a model that merely learned stain colour. Everything here is recomputed from the run
folder (shards, weights, metrics), so the report also works on runs copied from another machine.

The HTML embeds every figure as a base64 PNG (one file to mail or attach to a ticket); the
Markdown references the same PNGs, written beside it, for repositories and wikis. A
`report.json` beside them holds the checked numbers (cross-site matrix, leakage, baseline) for
scripts and CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedray.artifacts.run_folder import REPORT, run_weights
from fedray.data.labels import CLASSES
from fedray.metrics import classification_metrics
from fedray.report.checks import (
    SHORTCUT_MARGIN,
    CrossSite,
    Leakage,
    cross_site_matrix,
    leakage_check,
    mean_colour_baseline,
    shortcut_flag,
    split_files,
)
from fedray.report.compare import COMPARE_KEYS, compare_runs, compare_table, plot_compare
from fedray.report.document import (
    Block,
    Figure,
    Section,
    Table,
    Text,
    _write,
    render_html,
    render_markdown,
)
from fedray.report.figures import OVERVIEW, REPORT_PNGS, TIMING_PARTS, overview, round_timing
from fedray.report.run import Evaluator, Run
from fedray.report.sections import (
    TITLES,
    checks_section,
    cross_site_section,
    curves_section,
    data_section,
    evaluation_section,
    explanations_section,
    headline_alerts,
    privacy_section,
    summary_section,
    timing_section,
)

__all__ = [
    "COMPARE_KEYS", "OVERVIEW", "REPORT_PNGS", "SHORTCUT_MARGIN", "TIMING_PARTS", "TITLES",
    "Block", "CrossSite", "Evaluator", "Figure", "Leakage", "Run", "Section", "Table", "Text",
    "build_report", "compare_runs", "compare_table", "cross_site_matrix", "leakage_check",
    "mean_colour_baseline", "plot_compare", "render_html", "render_markdown", "round_timing",
    "shortcut_flag", "split_files",
]


def build_report(run_dir: Path, out_dir: Path | None = None, *,
                 explanations: int = 8) -> tuple[Path, Path]:
    """Write report.html (self-contained), report.md, report.json and the PNGs; return the
    HTML and Markdown paths. `explanations` is how many test images get a Grad-CAM overlay."""
    run = Run.load(Path(run_dir))
    out = Path(out_dir) if out_dir is not None else run.dir / REPORT
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_PNGS:  # a rebuilt report must not keep an old run's pictures around
        (out / name).unlink(missing_ok=True)
    if run.site_mode:
        from fedray.report.sites import build_site_report

        return build_site_report(run, out)
    ev = Evaluator(run)
    model = ev.model(run_weights(run.dir))
    pred = ev.predict(model, run.shards.test)
    metrics = classification_metrics(pred.labels, pred.probs, list(CLASSES))
    cs = cross_site_matrix(run, ev)
    leak = leakage_check(run.shards)
    baseline = mean_colour_baseline(run.shards)
    flagged = shortcut_flag(metrics["balanced_accuracy"], baseline["balanced_accuracy"])
    sections = [
        summary_section(run, headline_alerts(leak, flagged)), data_section(run),
        curves_section(run, out),
        evaluation_section(run, metrics, pred, out), privacy_section(run, out),
        timing_section(run, out), explanations_section(ev, model, pred, out, explanations),
        cross_site_section(cs, out), checks_section(leak, baseline, metrics),
    ]
    _write_json(out / "report.json", run, metrics, cs, leak, baseline)
    overview(out, f"fedray report: {run.name}  (test accuracy {metrics['accuracy']:.3f})")
    return _write(out, "report", f"fedray report: {run.name}", sections)


def _nan_to_none(a: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in a]


def _write_json(path: Path, run: Run, metrics: dict, cs: CrossSite, leak: Leakage,
                baseline: dict[str, float]) -> None:
    """The checked numbers, machine-readable, so CI can fail on leakage or a shortcut."""
    data = {
        "run": run.name,
        "test": {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                         "roc_auc_macro", "kappa")},
        "cross_site": {"rows": cs.rows, "columns": cs.columns, "sizes": cs.sizes,
                       "accuracy": _nan_to_none(cs.accuracy),
                       "balanced_accuracy": _nan_to_none(cs.balanced_accuracy)},
        "leakage": {"pairs": leak.pairs, "shared": leak.shared,
                    "between_hospitals": leak.between_hospitals,
                    "stale_hashes": leak.stale_hashes, "recorded": leak.recorded},
        "mean_colour_baseline": baseline,
        "shortcut_flag": shortcut_flag(metrics["balanced_accuracy"],
                                       baseline["balanced_accuracy"]),
    }
    path.write_text(json.dumps(data, indent=2))
