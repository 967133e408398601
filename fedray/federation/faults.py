"""Deterministic fault injection: a named process raises or exits at a named point of a round.

Test-only. `runtime.fault_injection` lists the points; the hospital and the coordinator each
hold a `FaultInjector` for their own name and call `at(point, round)` where a crash matters:

- a hospital: `before_fit`, `after_fit` (trained, state not yet saved), `after_state_saved`
  (state and ledger durable, the update not yet sent);
- the coordinator: `before_checkpoint`, `after_checkpoint`;
- either: `during_write` (a temp file is durable, the rename has not happened).

`raise` raises FaultInjected; `exit` ends the process at once (os._exit), as a kill would,
so Ray sees the actor die; `hang` never returns (a straggler that no deadline can outwait).
Tests name the point instead of racing a timer.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fedray.config import FaultPoint

EXIT_CODE = 17


class FaultInjected(RuntimeError):
    """Raised at a configured fault point (test-only)."""


class FaultInjector:
    """The fault points configured for one process."""

    def __init__(self, process: str, points: Sequence[FaultPoint] = ()) -> None:
        self.process = process
        self.points = [p for p in points if p.process == process]

    def __bool__(self) -> bool:
        return bool(self.points)

    def at(self, point: str, round_number: int | None = None, path: Path | str | None = None) -> None:
        for p in self.points:
            if p.point != point or (p.round is not None and p.round != round_number):
                continue
            if p.path_contains is not None and (path is None or p.path_contains not in str(path)):
                continue
            where = f"{self.process} at {point} (round {round_number})"
            if p.action == "exit":
                print(f"fault injection: {where}: exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_CODE)
            if p.action == "hang":
                print(f"fault injection: {where}: hanging", file=sys.stderr, flush=True)
                threading.Event().wait()
            raise FaultInjected(f"fault injection: {where}" + (f", writing {path}" if path else ""))

    def write_hook(self, round_number: int | None):
        """The `during_write` hook for atomic writes in this round, or None when unused."""
        if not any(p.point == "during_write" for p in self.points):
            return None
        return lambda path: self.at("during_write", round_number, path)
