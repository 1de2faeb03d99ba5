"""The policies the drift benchmark compares, by their stable names (JSON keys tools read)."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from adaspec.core.controller.baselines import OraclePolicy, SGLangAdaptivePolicy
from adaspec.core.controller.policy import AtlasPolicy
from adaspec.core.controller.settings import ControllerSettings
from adaspec.core.drift.costs import StepCosts
from adaspec.core.engine.engine import FixedPolicy, Policy

POLICIES = ("none", "static", "suffix", "adaptive", "sglang-ema", "atlas", "oracle")
LEARNED = ("static", "adaptive", "suffix")  # ATLAS and the oracle choose among these

_DRAFTERS = {
    "none": (), "static": ("static",), "suffix": ("suffix",), "adaptive": ("adaptive",),
    "sglang-ema": ("static",), "atlas": LEARNED, "oracle": LEARNED,
}


def drafters_for(policy: str) -> tuple[str, ...]:
    return _DRAFTERS[policy]


def uses_adaptive(policy: str) -> bool:
    return "adaptive" in _DRAFTERS[policy]


def make(name: str, k: int, costs: StepCosts, controller: ControllerSettings,
         oracle: Callable[[Any, str, int], int] | None = None) -> Policy:
    """Fixed-k baselines draft `k`; ATLAS and the oracle price steps with the same frozen measured costs."""
    if name == "none":
        return FixedPolicy(None, 0)
    if name in ("static", "suffix", "adaptive"):
        return FixedPolicy(name, k)
    if name == "sglang-ema":
        return SGLangAdaptivePolicy("static")
    if name == "atlas":
        return AtlasPolicy(LEARNED, controller, costs=costs.cost_model())
    if name == "oracle":
        if oracle is None:
            raise ValueError("the oracle policy needs the trace oracle")
        return OraclePolicy(LEARNED, oracle, costs.cost_model(), max_k=controller.max_k)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")


class TimedPolicy:
    """Forwards to a policy and accumulates the time spent in it (controller decision time)."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.request_steps = 0
        trim = getattr(inner, "trim", None)
        self.trim = self._trim if trim is not None else None
        if getattr(inner, "finish", None) is None:
            self.finish = None  # type: ignore[assignment]
        self.peek = getattr(inner, "peek", None)
        self.peek_k = getattr(inner, "peek_k", 0)

    def plan(self, requests: Sequence) -> list:
        t0 = time.perf_counter()
        out = self.inner.plan(requests)
        self.seconds += time.perf_counter() - t0
        self.request_steps += len(requests)
        return out

    def feedback(self, records: Sequence) -> None:
        t0 = time.perf_counter()
        self.inner.feedback(records)
        self.seconds += time.perf_counter() - t0

    def peeked(self, drafter, requests, drafts) -> None:
        t0 = time.perf_counter()
        self.inner.peeked(drafter, requests, drafts)  # type: ignore[attr-defined]
        self.seconds += time.perf_counter() - t0

    def _trim(self, request, drafter, draft) -> int:
        t0 = time.perf_counter()
        n = self.inner.trim(request, drafter, draft)  # type: ignore[attr-defined]
        self.seconds += time.perf_counter() - t0
        return n

    def finish(self, request_id: str) -> None:  # type: ignore[no-redef]
        self.inner.finish(request_id)  # type: ignore[attr-defined]

    @property
    def us_per_request_step(self) -> float:
        return self.seconds / max(1, self.request_steps) * 1e6
