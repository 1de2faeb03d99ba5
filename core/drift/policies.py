"""The policies the drift benchmark compares come from the policy registry (`adaspec.core.controller.registry`,
whose names are the benchmark's stable JSON keys); here only the wrapper that times the controller."""

from __future__ import annotations

import time
from typing import Sequence

from adaspec.core.drafters.base import Draft, DraftRequest
from adaspec.core.step import Plan, PlanRequest, PolicyBase, StepRecord


class TimedPolicy(PolicyBase):
    """Forwards every hook to a policy and accumulates the time spent in it (controller decision time)."""

    def __init__(self, inner: PolicyBase) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.request_steps = 0

    @property
    def peek(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.peek

    @property
    def peek_k(self) -> int:  # type: ignore[override]
        return self.inner.peek_k

    @property
    def lam(self) -> float:  # type: ignore[override]
        return self.inner.lam

    def plan(self, requests: Sequence[PlanRequest]) -> list[Plan]:
        t0 = time.perf_counter()
        out = self.inner.plan(requests)
        self.seconds += time.perf_counter() - t0
        self.request_steps += len(requests)
        return out

    def feedback(self, records: Sequence[StepRecord]) -> None:
        t0 = time.perf_counter()
        self.inner.feedback(records)
        self.seconds += time.perf_counter() - t0

    def peeked(self, drafter: str, requests: Sequence[PlanRequest], drafts: Sequence[Draft]) -> None:
        t0 = time.perf_counter()
        self.inner.peeked(drafter, requests, drafts)
        self.seconds += time.perf_counter() - t0

    def trim(self, request: DraftRequest, drafter: str, draft: Draft) -> int:
        t0 = time.perf_counter()
        n = self.inner.trim(request, drafter, draft)
        self.seconds += time.perf_counter() - t0
        return n

    def finish(self, request_id: str) -> None:
        self.inner.finish(request_id)

    def set_available(self, drafter: str, available: bool) -> None:
        self.inner.set_available(drafter, available)

    def set_padded_verify(self, padded: bool, multiple: int = 1) -> None:
        self.inner.set_padded_verify(padded, multiple)

    @property
    def us_per_request_step(self) -> float:
        return self.seconds / max(1, self.request_steps) * 1e6
