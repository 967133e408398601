"""DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
client-level differential privacy added by the server, as Flower's
`DifferentialPrivacyServerSideFixedClipping` does.

Each round, for the m hospitals whose results arrived:

    u_i   = w_i - current                                (floating-point tensors only)
    u_i  <- u_i * min(1, clip_norm / ||u_i||)            (||.|| over all float tensors at once)
    new   = current + mean_i(u_i) + N(0, (noise_multiplier * clip_norm / m)^2)   per coordinate

The mean is unweighted: one hospital is one unit of privacy, whatever its sample count (the
fixed weights of DP-FedAvg). Integer tensors (BatchNorm's num_batches_tracked) carry no
gradient signal and take the plain, unweighted mean of the hospitals' values, rounded.

The noise comes from OS entropy (`secrets`): nobody holding the config, the checkpoints or the
model can recompute it. Only a debugging run (privacy.reproducible_noise, seed given) seeds it
from (seed, round), and every output of such a run says its epsilon is no guarantee. The release is
accounted, one step per counted round, by an Opacus accountant (RDP by default) with sample
rate q = selected / total_hospitals: privacy amplification by sampling hospitals. The history
is in `state_dict()`, so epsilon survives a resume and only ever grows.

Caveats, as in Flower: the accountant's analysis is for Poisson sampling of hospitals, while
`select` draws a fixed-size sample, and the mean divides by the number of results that
arrived, not by the expected count; the usual approximations of DP-FedAvg in practice. When
the coordinator samples from fewer hospitals than `total_hospitals` (some excluded), q uses
the smaller pool, which only raises epsilon. The per-round report (how many updates were
clipped) is a plain, non-private statistic, meant for the trusted server's own records.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from typing import Any

import numpy as np

from fedray.federation.messages import Failure, FitRes
from fedray.strategy.base import Strategy


def _create_accountant(mechanism: str):
    # Imported here: Opacus (and what it pulls in) stays out of `import fedray.strategy`.
    from opacus.accountants.utils import create_accountant

    return create_accountant(mechanism=mechanism)


def _finite(name: str, value: float, low: float, low_open: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and (number > low if low_open else number >= low)):
        raise ValueError(f"DPFedAvg {name} must be a finite number {'>' if low_open else '>='} "
                         f"{low}, got {value!r}")
    return number


class DPFedAvg(Strategy):
    """Unweighted FedAvg of clipped updates plus Gaussian noise, with a client-level ledger."""

    def __init__(self, min_clients: int = 1, fraction: float = 1.0, *, clip_norm: float,
                 noise_multiplier: float, delta: float = 1e-5, total_hospitals: int | None = None,
                 seed: int | None = None, accountant: str = "rdp") -> None:
        super().__init__(min_clients=min_clients, fraction=fraction)
        self.clip_norm = _finite("clip_norm", clip_norm, 0.0, low_open=True)
        self.noise_multiplier = _finite("noise_multiplier", noise_multiplier, 0.0, low_open=False)
        self.delta = _finite("delta", delta, 0.0, low_open=True)
        if self.delta >= 1.0:
            raise ValueError(f"DPFedAvg delta must be in (0, 1), got {delta!r}")
        if total_hospitals is not None and (int(total_hospitals) != total_hospitals
                                            or total_hospitals < 1):
            raise ValueError(f"DPFedAvg total_hospitals must be an integer >= 1, "
                             f"got {total_hospitals!r}")
        self.total_hospitals = None if total_hospitals is None else int(total_hospitals)
        if seed is not None and (int(seed) != seed or seed < 0):
            raise ValueError(f"DPFedAvg seed must be an integer >= 0 or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self.accountant_name = accountant
        self.accountant = _create_accountant(accountant)  # ValueError for an unknown mechanism
        self._selection: tuple[int, int, int] | None = None  # (round, selected, pool size)
        self._report: dict[str, Any] = {}
        self._epsilon_cache: tuple[tuple, float] | None = None  # RDP's conversion is not free

    # ---- selection and accounting ----------------------------------------------------------
    def select(self, round_number: int, available: list[str],
               rng: np.random.Generator) -> list[str]:
        """As every strategy; remembers how many were drawn, and from how many, for q."""
        chosen = super().select(round_number, available, rng)
        self._selection = (round_number, len(chosen), len(available))
        return chosen

    def sample_rate(self, round_number: int, results: list[FitRes],
                    failures: list[Failure]) -> float:
        """q = selected / total_hospitals (the pool drawn from, when smaller) for this round.

        `selected` is what `select` drew for this round; without a `select` call (a caller that
        picks hospitals itself), the hospitals that answered or failed.
        """
        if self.total_hospitals is None:
            raise ValueError("DPFedAvg needs total_hospitals (the number of hospitals that "
                             "could be sampled) for its privacy accounting: pass it to the "
                             "constructor or set strategy.total_hospitals before round 1")
        population = self.total_hospitals
        if self._selection is not None and self._selection[0] == round_number:
            selected = self._selection[1]
            population = min(population, self._selection[2])
        else:
            selected = len({r.hospital for r in results} | {f.hospital for f in failures})
        if selected > population:
            raise ValueError(f"DPFedAvg: {selected} hospitals selected in round {round_number} "
                             f"but total_hospitals is {self.total_hospitals}")
        return selected / population

    def epsilon(self, delta: float | None = None) -> float:
        """Client-level epsilon spent so far at `delta` (the constructor's by default)."""
        if not self.accountant.history:
            return 0.0
        if any(sigma == 0 and q > 0 for sigma, q, _ in self.accountant.history):
            return math.inf  # a release without noise: no finite bound (and no Opacus warning)
        delta = self.delta if delta is None else float(delta)
        key = (tuple(self.accountant.history), delta)
        if self._epsilon_cache is None or self._epsilon_cache[0] != key:
            self._epsilon_cache = (key, float(self.accountant.get_epsilon(delta)))
        return self._epsilon_cache[1]

    @property
    def dp_rounds(self) -> int:
        return int(sum(entry[2] for entry in self.accountant.history))

    def noise_std(self, aggregated: int) -> float:
        return self.noise_multiplier * self.clip_norm / aggregated

    def noise_rng(self, round_number: int) -> np.random.Generator:
        """The generator of round `round_number`'s noise: fresh OS entropy, or, with a seed
        (reproducible debugging runs only), the same on every run."""
        if self.seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(round_number)]))

    # ---- the round --------------------------------------------------------------------------
    def aggregate(
        self, round_number: int, current: OrderedDict, results: list[FitRes],
        failures: list[Failure],
    ) -> OrderedDict | None:
        if not self.enough(results):
            return None
        q = self.sample_rate(round_number, results, failures)
        ordered = self.ordered(results)
        names = list(current.keys())
        for r in ordered:
            if list(r.weights.keys()) != names:
                raise ValueError(f"hospital {r.hospital}'s weights and the current global model "
                                 "disagree on parameter names")
            for name in names:
                if np.shape(r.weights[name]) != np.shape(current[name]):
                    raise ValueError(f"hospital {r.hospital}'s weights and the current global "
                                     f"model disagree on the shape of {name!r}")
        floats = [n for n in names if np.issubdtype(np.asarray(current[n]).dtype, np.floating)]
        base = {n: np.asarray(current[n], dtype=np.float64) for n in floats}

        m = len(ordered)
        total = {n: np.zeros(base[n].shape, dtype=np.float64) for n in floats}
        clipped = 0
        for r in ordered:
            update = {n: np.asarray(r.weights[n], dtype=np.float64) - base[n] for n in floats}
            norm = math.sqrt(sum(float(np.vdot(u, u)) for u in update.values()))
            scale = 1.0
            if norm > self.clip_norm:
                scale, clipped = self.clip_norm / norm, clipped + 1
            for n in floats:
                total[n] += update[n] * scale

        std = self.noise_std(m)
        rng = self.noise_rng(round_number)
        out: OrderedDict = OrderedDict()
        for name in names:
            ref = np.asarray(current[name])
            if name in total:
                noise = rng.standard_normal(ref.shape) * std
                out[name] = (base[name] + (total[name] / m + noise)).astype(ref.dtype)
            else:
                acc = np.zeros(ref.shape, dtype=np.float64)
                for r in ordered:
                    acc += np.asarray(r.weights[name], dtype=np.float64)
                out[name] = np.rint(acc / m).astype(ref.dtype)

        # Only once the whole round succeeded: the release is accounted, then reported.
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=q)
        self._report = {
            "round": int(round_number),
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "noise_std": float(std),
            "aggregated": m,
            "sample_rate": float(q),
            "clipped": clipped,
            "delta": self.delta,
            "dp_rounds": self.dp_rounds,
            "accountant": self.accountant_name,
        }
        return out

    def last_round_report(self) -> dict[str, Any]:
        """The last counted round's DP figures, with the epsilon spent up to it.

        Keys: round, clip_norm, noise_multiplier, noise_std, aggregated (m), sample_rate (q),
        clipped (how many of the m updates were scaled down), epsilon, delta, dp_rounds,
        accountant. Plain ints/floats/str; epsilon is inf for a run without noise. Empty before
        the first counted round of this process; a round that did not count (too few results)
        releases nothing, costs no privacy and leaves the report as it was.
        """
        if not self._report:
            return {}
        return {**self._report, "epsilon": self.epsilon()}  # computed here, only when asked

    # ---- the strategy contract ---------------------------------------------------------------
    def bind(self, hospitals: list[str], model: Any, noise_seed: int | None) -> None:
        """q's population (unless given) and the noise's seed (None: OS entropy)."""
        del model
        if self.total_hospitals is None:
            self.total_hospitals = len(hospitals)
        self.seed = noise_seed

    def round_report(self) -> dict[str, Any]:
        report = self.last_round_report()
        if not report:
            return {}
        if report.get("epsilon") == float("inf"):
            report["epsilon"] = None  # no noise: no guarantee; JSON has no infinity
        return {"server_dp": report}

    def privacy(self) -> dict[str, Any]:
        epsilon = self.epsilon()
        return {"unit": "hospital", "epsilon": None if epsilon == math.inf else epsilon,
                "delta": self.delta, "rounds": self.dp_rounds,
                "noise_multiplier": self.noise_multiplier, "accountant": self.accountant_name}

    # ---- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"seed", "total_hospitals", "accountant": {"mechanism", "history": [[sigma, q, k]]}}.

        Plain ints, floats and lists (JSON-ready, and safe for `checkpoint.save_tree`).
        """
        return {
            "seed": self.seed,
            "total_hospitals": self.total_hospitals,
            "accountant": {"mechanism": self.accountant_name,
                           "history": [[float(s), float(q), int(k)]
                                       for s, q, k in self.accountant.history]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; an empty dict leaves a fresh ledger."""
        if not state:
            return
        acc = state["accountant"]
        if acc["mechanism"] != self.accountant_name:
            raise ValueError(f"DPFedAvg state was accounted with {acc['mechanism']!r}, "
                             f"this strategy uses {self.accountant_name!r}")
        accountant = _create_accountant(self.accountant_name)
        accountant.history = [(float(s), float(q), int(k)) for s, q, k in acc["history"]]
        self.accountant = accountant
        if state.get("seed") is not None:
            self.seed = int(state["seed"])
        if self.total_hospitals is None and state.get("total_hospitals") is not None:
            self.total_hospitals = int(state["total_hospitals"])
