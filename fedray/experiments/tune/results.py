"""A sweep's results: the table (results.csv, results.parquet), the curves plot, the best
trial and the privacy total over every trial."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedray.experiments.tune.config import FINAL_KEYS, Sweep, SweepConfig
from fedray.experiments.tune.trial import _get, _is_uri, _put, final_metrics

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class SweepResult:
    folder: str
    table: pd.DataFrame
    best: dict | None



def _history(frame: pd.DataFrame | None) -> list[dict]:
    """One row per round (the last report wins, should a resumed trial report one twice)."""
    if frame is None or frame.empty or "round" not in frame:
        return []
    frame = frame.dropna(subset=["round"]).drop_duplicates("round", keep="last")
    return frame.sort_values("round").to_dict("records")


def _number(value: Any) -> Any:
    """None for a missing value (None or NaN), else the value."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def ranked_on(config: SweepConfig) -> str:
    """The column trials are ranked on: the sweep's metric of the model each run saved."""
    return f"final_{config.metric}"


def _peak(history: list[dict], metric: str, mode: str) -> tuple[int | None, float | None]:
    """The best value of the metric in any round, and its round."""
    scored = [(h[metric], int(h["round"])) for h in history if _number(h.get(metric)) is not None]
    if not scored:
        return None, None
    pick = max if mode == "max" else min
    value = pick(v for v, _ in scored)
    return next(r for v, r in scored if v == value), float(value)


def trial_row(trial_id: str, params: dict, history: list[dict], final: dict | None,
              error: str | None, config: SweepConfig) -> dict:
    """One row of the results table, from what a trial reported and its final evaluation
    (`final_metrics` of the run; None when the trial stopped early or failed).

    Trials rank on final_<metric>: the metric of the model the run saved (the round of lowest
    validation loss, `saved_round`), which is what `fedray export` packages. peak_<metric> is
    the metric's best value in any round (`peak_round`), the only score of a stopped trial.
    """
    peak_round, peak_value = _peak(history, config.metric, config.mode)
    last = history[-1] if history else {}
    eps = [h["epsilon_max"] for h in history if _number(h.get("epsilon_max")) is not None]
    status = "error" if error else "completed" if final else "stopped" if history else "not run"
    finals = {f"final_{split}_{k}": _number((final or {}).get(f"final_{split}_{k}"))
              for split in ("val", "test") for k in FINAL_KEYS}
    saved_round = _number((final or {}).get("final_round"))
    return {"trial_id": trial_id, "status": status,
            **{key: params.get(key) for key in config.space},
            "rounds": int(last["round"]) if last else 0,
            ranked_on(config): finals.pop(ranked_on(config)),
            "saved_round": None if saved_round is None else int(saved_round),
            f"peak_{config.metric}": peak_value, "peak_round": peak_round, **finals,
            "epsilon_max": max(eps) if eps else None, "seconds": last.get("time_total_s"),
            "run_dir": last.get("run_dir"), "error": error}


def _final(history: list[dict]) -> dict | None:
    """The final evaluation a trial reported with its last round, or else its run's
    metrics.json (a trial whose run had finished before the sweep was interrupted)."""
    if not history:
        return None
    reported = {k: v for k, v in history[-1].items()
                if k.startswith("final_") and _number(v) is not None}
    if reported:
        return reported
    raw = _get(f"{history[-1]['run_dir']}/metrics.json") if history[-1].get("run_dir") else None
    return final_metrics(json.loads(raw)) if raw else None


def _arrow(table: pd.DataFrame) -> Any:
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(table, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a searched field of mixed types
        mixed = table.astype({c: str for c in table.columns if table[c].dtype == object})
        return pa.Table.from_pandas(mixed, preserve_index=False)


def _plot(curves: dict[str, tuple[list[dict], str]], metric: str) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for label, (history, status) in curves.items():
        ax.plot([h["round"] for h in history], [h[metric] for h in history], marker="o",
                linestyle="-" if status == "completed" else "--", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per round (dashed: stopped early or failed)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def summarize(folder: str, grid: Any, sweep: Sweep,
              log: Callable[[str], None] = print) -> SweepResult:
    """The results table (printed; results.csv and results.parquet), curves.png and best.json."""
    import pandas as pd
    import pyarrow.parquet as pq

    c = sweep.config
    rows, curves = [], {}
    for result in grid:
        trial_id = Path(str(result.path)).name.removeprefix("trial_")
        history = _history(result.metrics_dataframe)
        error = str(result.error).strip().splitlines()[-1][:300] if result.error else None
        row = trial_row(trial_id, result.config, history, _final(history), error, c)
        rows.append(row)
        if history:
            label = trial_id + " " + " ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}"
                                              for k in c.space)
            curves[label] = (history, row["status"])
    table = pd.DataFrame(rows)
    if not table.empty:  # finished trials by their saved model, then stopped ones by their peak
        table = table.sort_values([ranked_on(c), f"peak_{c.metric}", "trial_id"],
                                  ascending=[c.mode == "min", c.mode == "min", True],
                                  na_position="last")
    _put(folder, "results.csv", table.to_csv(index=False).encode())
    buffer = io.BytesIO()
    pq.write_table(_arrow(table), buffer)
    _put(folder, "results.parquet", buffer.getvalue())
    _put(folder, "curves.png", _plot(curves, c.metric))
    best = best_trial(rows, c)
    if best:
        best["epsilon_trial"] = next((r["epsilon_max"] for r in rows
                                      if r["trial_id"] == best["trial_id"]), None)
        best["privacy_total"] = sweep_privacy_total(rows)
        _put(folder, "best.json", json.dumps(best, indent=2).encode())
    log(_console_table(table, folder, c))
    for row in rows:
        if row["error"]:
            log(f"trial {row['trial_id']} failed: {row['error']}")
    if best:
        log(f"best: trial {best['trial_id']} {best['ranked_on']} {best['value']:.4f} (the model "
            f"of round {best['round']}); run folder {best['run_dir']}")
    log(f"results: {folder}/results.csv, results.parquet, curves.png"
        + (", best.json" if best else ""))
    return SweepResult(folder, table, best)


def sweep_privacy_total(rows: list[dict]) -> dict | None:
    """Every trial trained on the same hospitals' data: their ledgers composed (see
    fedray.privacy.totals). Trials on remote storage are read where they were downloaded to;
    a trial folder that cannot be read locally is named in `unread`."""
    from fedray.privacy.totals import total_epsilon

    local = [r["run_dir"] for r in rows if r.get("run_dir") and not _is_uri(r["run_dir"])
             and Path(r["run_dir"]).is_dir()]
    total = total_epsilon([Path(d) for d in local])
    unread = [r["run_dir"] for r in rows if r.get("run_dir") and r["run_dir"] not in local]
    if total is not None and unread:
        total["unread"] = unread
    return total


def _console_table(table: pd.DataFrame, folder: str, config: SweepConfig) -> str:
    """The table as printed: the sweep's metric among the final ones (all are in the CSV)."""
    if table.empty:
        return "no trials"
    name = config.metric.removeprefix("val_")
    columns = ["trial_id", "status", *config.space, "rounds", ranked_on(config), "saved_round",
               f"final_test_{name}", f"peak_{config.metric}", "peak_round", "epsilon_max",
               "seconds", "run_dir"]
    shown = table[columns].copy()
    shown["run_dir"] = [str(r).removeprefix(folder + "/") if isinstance(r, str) else r
                        for r in shown["run_dir"]]
    return shown.to_string(index=False, float_format=lambda x: f"{x:.4g}")


def best_trial(rows: list[dict], config: SweepConfig) -> dict | None:
    """The trial whose saved model scores best on the sweep's metric (its final validation
    evaluation); when no trial finished, the stopped one with the best value in any round
    (`ranked_on` says which)."""
    pick = max if config.mode == "max" else min
    for key, round_key in ((ranked_on(config), "saved_round"),
                           (f"peak_{config.metric}", "peak_round")):
        pool = [r for r in rows if _number(r[key]) is not None]
        if pool:
            row = pick(pool, key=lambda r: r[key])
            return {"trial_id": row["trial_id"], "run_dir": row["run_dir"],
                    "status": row["status"], "metric": config.metric, "mode": config.mode,
                    "ranked_on": key, "value": row[key], "round": row[round_key],
                    "params": {k: row[k] for k in config.space}}
    return None
