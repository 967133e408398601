"""Privacy spent across several runs on the same data: sweeps, folds, compared variants.

Every trial of a sweep, every fold of a cross-validation and every variant of a comparison
trains on the same hospitals' patients with a fresh ledger, so one trial's epsilon understates
what the hospital's data has given away. The total composes every run's ledger for a hospital
with the same accountant: the runs' (sigma, q, steps) histories are concatenated into one
accountant and converted to epsilon once, at the hospital's delta. RDP (and PRV) composition
is additive and holds under adaptive composition, so this is a valid upper bound whatever the
trials chose to do. It is per hospital name: exact for sweeps and comparisons (the same shards
in every trial); for cross-validation, where folds re-partition the data, `any_record` also
composes every hospital's ledger of every run, a bound for any record wherever it was held.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedray.privacy.ledger import LEDGER_FILE, read_ledger


def _history_epsilon(mechanism: str, history: list, delta: float) -> float:
    from opacus.accountants.utils import create_accountant

    if not history:
        return 0.0
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(float(s), float(q), int(k)) for s, q, k in history]
    return float(accountant.get_epsilon(delta))


def run_ledgers(run_dir: Path) -> dict[str, dict[str, Any]]:
    """A run's per-hospital ledgers: the histories metrics.json carries (read from the
    hospitals' own ledgers, wherever they live), else the ledger files in the run folder."""
    run_dir = Path(run_dir)
    try:
        reported = json.loads((run_dir / "metrics.json").read_text()).get("privacy") or {}
    except (OSError, ValueError):
        reported = {}
    out = {}
    for name, info in (reported.get("hospitals") or {}).items():  # site-local ledgers
        if "history" in info:
            out[name] = {"history": info["history"], "mechanism": info.get("accountant", "rdp"),
                         "delta": info.get("delta"), "epsilon": info.get("epsilon"),
                         "unit": info.get("unit", reported.get("unit"))}
    for path in sorted((run_dir / "hospitals").glob(f"*/{LEDGER_FILE}")):
        if path.parent.name in out:
            continue
        ledger = read_ledger(path)
        if ledger is None:
            continue
        name = path.parent.name
        info = (reported.get("hospitals") or {}).get(name, {})
        out[name] = {"history": ledger["history"], "mechanism": ledger["mechanism"],
                     "delta": info.get("delta"), "epsilon": info.get("epsilon"),
                     "unit": info.get("unit", reported.get("unit"))}
    return out


def total_epsilon(run_dirs: list[Path]) -> dict[str, Any] | None:
    """Each hospital's epsilon composed over every run, beside each run's own; None when no
    run used DP-SGD."""
    per_run = {str(Path(d)): run_ledgers(d) for d in run_dirs}
    names = sorted({h for ledgers in per_run.values() for h in ledgers})
    if not names:
        return None
    hospitals: dict[str, Any] = {}
    everything: list = []
    mechanisms, deltas = set(), []
    for name in names:
        entries = [(run, ledgers[name]) for run, ledgers in per_run.items() if name in ledgers]
        mechanism = entries[0][1]["mechanism"]
        delta = min(e["delta"] for _, e in entries if e["delta"] is not None) \
            if any(e["delta"] is not None for _, e in entries) else 1e-5
        history = [h for _, e in entries for h in e["history"]]
        everything += history
        mechanisms.add(mechanism)
        deltas.append(delta)
        hospitals[name] = {
            "epsilon_total": _history_epsilon(mechanism, history, delta), "delta": delta,
            "runs": len(entries), "per_run": {run: e["epsilon"] for run, e in entries},
            "unit": entries[0][1]["unit"]}
    mechanism = mechanisms.pop() if len(mechanisms) == 1 else "rdp"
    return {"accountant": mechanism,
            "composition": "the runs' ledgers concatenated into one accountant (RDP "
                           "composition), converted to epsilon once at the hospital's delta",
            "hospitals": hospitals,
            "any_record": {"epsilon_total": _history_epsilon(mechanism, everything, min(deltas)),
                           "delta": min(deltas)}}
