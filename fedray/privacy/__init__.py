"""Differential privacy: DP-SGD wiring (wrap), the per-hospital ledger, settings, ghost norms.

Importing the package is cheap: Opacus loads only when a private hospital is built, so
non-private actors never pay for it.
"""

from __future__ import annotations

from typing import Any

from fedray.privacy.errors import PrivacyBudgetExhausted
from fedray.privacy.ledger import LEDGER_FILE, PrivacyLedger, epsilon_for, read_ledger

_LAZY = {
    "PrivacySettings": "fedray.privacy.settings", "resolve": "fedray.privacy.settings",
    "PrivateTraining": "fedray.privacy.wrap", "make_private": "fedray.privacy.wrap",
}

__all__ = ["LEDGER_FILE", "PrivacyBudgetExhausted", "PrivacyLedger", "epsilon_for",
           "read_ledger", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedray.privacy' has no attribute {name!r}")
