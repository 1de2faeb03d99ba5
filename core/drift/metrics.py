"""What the drift benchmark reports per policy: tau per phase / window / stream, modeled speedup, recovery.

tau = emitted tokens / target forwards (prefill included), summed over the requests of a slice, as everywhere
in adaspec. Windows are consecutive `window` requests in stream order. Recovery (per phase): requests from
the phase's start until the rolling tau (last `smooth` requests) first reaches 90% of the phase's plateau
(tau over the second half of the phase); a phase that starts at its plateau recovers in 1 request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from adaspec.core.drift.step_costs import StepCosts
from adaspec.core.engine.engine import GenerationResult
from adaspec.core.step import StepRecord
RECOVERY_FRACTION = 0.9


@dataclass(frozen=True)
class RequestOutcome:
    """One stream request under one policy."""

    index: int
    phase: str
    tokens: int
    forwards: int
    modeled_s: float  # this request's share of modeled step time
    wall_s: float  # live mode: its wall time in the engine (0 on replay)
    drafter_tokens: dict  # drafter -> accepted draft tokens

    @property
    def tau(self) -> float:
        return self.tokens / max(1, self.forwards)


class ModeledClock:
    """Engine step listener: each request's share of every step's modeled time (batched draft steps are shared
    by the requests of the step that used them, so shares need the whole step)."""

    def __init__(self, costs: StepCosts) -> None:
        self.costs = costs
        self.shares: dict[tuple[str, int], float] = {}

    def __call__(self, records: Sequence[StepRecord]) -> None:
        for r, t in zip(records, self.costs.step_shares(records)):
            self.shares[(r.request_id, r.step)] = t

    def request_time(self, res: GenerationResult) -> float:
        """Every record passed through the listener (the engines call it for each step, prefill included)."""
        return sum(self.shares[(r.request_id, r.step)] for r in res.records)


def outcome(index: int, phase: str, res: GenerationResult, clock: ModeledClock) -> RequestOutcome:
    accepted: dict[str, int] = {}
    for r in res.records:
        if r.drafter and r.accepted:
            accepted[r.drafter] = accepted.get(r.drafter, 0) + r.accepted
    return RequestOutcome(index, phase, len(res.output_tokens), res.target_forwards, clock.request_time(res),
                          res.wall_s, accepted)


def tau_of(outs: Sequence[RequestOutcome]) -> float:
    return sum(o.tokens for o in outs) / max(1, sum(o.forwards for o in outs))


def windows(outs: Sequence[RequestOutcome], size: int) -> list[float]:
    """tau of consecutive `size`-request windows in stream order (a shorter tail window is kept)."""
    ordered = sorted(outs, key=lambda o: o.index)
    return [tau_of(ordered[i : i + size]) for i in range(0, len(ordered), size)]


def window_times(outs: Sequence[RequestOutcome], size: int) -> list[float]:
    """Modeled seconds of the same windows as `windows` (equal requests and tokens across policies, so a ratio
    of two policies' window times is their speed ratio on that window)."""
    ordered = sorted(outs, key=lambda o: o.index)
    return [sum(o.modeled_s for o in ordered[i : i + size]) for i in range(0, len(ordered), size)]


def recovery(phase_outs: Sequence[RequestOutcome], smooth: int = 4) -> int:
    """Requests until the rolling tau reaches RECOVERY_FRACTION of the phase plateau (see module doc)."""
    ordered = sorted(phase_outs, key=lambda o: o.index)
    if not ordered:
        return 0
    plateau = tau_of(ordered[len(ordered) // 2 :])
    for i in range(len(ordered)):
        if tau_of(ordered[max(0, i + 1 - smooth) : i + 1]) >= RECOVERY_FRACTION * plateau:
            return i + 1
    return len(ordered)


def summarize(outs: Sequence[RequestOutcome], phases: Sequence[str], window: int,
              baseline_modeled: dict[str, float] | None) -> dict:
    """The JSON block of one policy (keys documented in the benchmark's module doc)."""
    by_phase = {p: [o for o in outs if o.phase == p] for p in phases}
    out_phases = {}
    for p, po in by_phase.items():
        modeled = sum(o.modeled_s for o in po)
        wall = sum(o.wall_s for o in po)
        tokens = sum(o.tokens for o in po)
        out_phases[p] = {
            "requests": len(po),
            "tokens": tokens,
            "forwards": sum(o.forwards for o in po),
            "tau": tau_of(po),
            "modeled_s": modeled,
            "modeled_speedup": (baseline_modeled[p] / modeled) if baseline_modeled and modeled else None,
            "wall_tok_s": (tokens / wall) if wall else None,
            "recovery_requests": recovery(po),
            "accepted_by_drafter": _sum_dicts(o.drafter_tokens for o in po),
        }
    modeled_total = sum(o.modeled_s for o in outs)
    return {
        "tau": tau_of(outs),
        "tokens": sum(o.tokens for o in outs),
        "forwards": sum(o.forwards for o in outs),
        "modeled_s": modeled_total,
        "modeled_speedup": (sum(baseline_modeled.values()) / modeled_total) if baseline_modeled and modeled_total
        else None,
        "phases": out_phases,
        "windows": windows(outs, window),
        "windows_modeled_s": window_times(outs, window),
        "per_request_tau": [o.tau for o in sorted(outs, key=lambda o: o.index)],
        "per_request_tok_s": [o.tokens / o.wall_s if o.wall_s else None for o in sorted(outs, key=lambda o: o.index)],
    }


def _sum_dicts(ds) -> dict:
    total: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total
