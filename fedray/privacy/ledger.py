"""The hospital's one accountant (its ledger) for the whole run.

It lives for the whole run and is saved apart from the optimizer state, so resuming a run
never rolls it back: epsilon only ever grows. Building a new PrivacyEngine each round, as
several federated examples do, silently resets epsilon to zero.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from fedray.artifacts import atomic
from fedray.artifacts.atomic import WriteHook

LEDGER_FILE = "ledger.json"


class PrivacyLedger:
    """The hospital's one accountant for the whole run."""

    def __init__(self, accountant: str) -> None:
        from opacus.accountants.utils import create_accountant

        self.accountant = create_accountant(mechanism=accountant)

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.accountant.history else 0.0

    def projected(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon after `steps` more steps, computed on a copy: the ledger itself is untouched."""
        trial = copy.deepcopy(self.accountant)
        trial.history.append((noise_multiplier, sample_rate, steps))
        return float(trial.get_epsilon(delta))

    @property
    def steps(self) -> int:
        return int(sum(entry[2] for entry in self.accountant.history))

    def state_dict(self) -> dict[str, Any]:
        state = self.accountant.state_dict()
        return {"history": [list(h) for h in state["history"]], "mechanism": state["mechanism"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(
            {"history": [tuple(h) for h in state["history"]], "mechanism": state["mechanism"]})

    def absorb(self, state: dict[str, Any] | None) -> bool:
        """Take `state` only if it records more steps than this ledger: a ledger never goes
        back. True when it was taken."""
        if not state or recorded_steps(state) <= self.steps:
            return False
        self.load_state_dict(state)
        return True

    def save(self, path: Path, releases: list[dict], hook: WriteHook | None = None) -> None:
        """Write the ledger atomically; called before the update it accounts leaves the
        hospital. A file that already records more steps is never overwritten."""
        on_disk = read_ledger(path)
        if on_disk is not None and recorded_steps(on_disk) > self.steps:
            raise RuntimeError(f"{path} records {recorded_steps(on_disk)} DP steps, this hospital only "
                               f"{self.steps}: refusing to replace a ledger with an older one")
        atomic.write_json(path, {**self.state_dict(), "steps": self.steps,
                                 "releases": releases}, hook)


def recorded_steps(state: dict[str, Any]) -> int:
    """The DP steps a ledger state (or a DP-FedAvg accountant state) records."""
    return int(sum(entry[2] for entry in state.get("history", [])))


def read_ledger(path: Path) -> dict[str, Any] | None:
    """A ledger file's content; None when it is missing or torn (unreadable JSON)."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "history" in state else None


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "rdp") -> float:
    """Epsilon of a fixed (sigma, q, steps) schedule, for planning and for tests."""
    ledger = PrivacyLedger(accountant)
    return ledger.projected(noise_multiplier, sample_rate, steps, delta) if steps else 0.0
