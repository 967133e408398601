"""The hospital's one accountant (its ledger) for the whole run.

It lives for the whole run and is saved apart from the optimizer state, so resuming a run
never rolls it back: epsilon only ever grows. Building a new PrivacyEngine each round, as
several federated examples do, silently resets epsilon to zero.
"""

from __future__ import annotations

import copy
from typing import Any

from opacus.accountants.utils import create_accountant


class PrivacyLedger:
    """The hospital's one accountant for the whole run."""

    def __init__(self, accountant: str) -> None:
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


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "rdp") -> float:
    """Epsilon of a fixed (sigma, q, steps) schedule, for planning and for tests."""
    ledger = PrivacyLedger(accountant)
    return ledger.projected(noise_multiplier, sample_rate, steps, delta) if steps else 0.0
