"""The hindsight oracle's view of a step: how much of each drafter's proposal the recorded answer accepts."""

from __future__ import annotations

from typing import Mapping, Sequence

from adaspec.core.drafters.base import Drafter
from adaspec.core.drift.traces import Trace
from adaspec.core.engine.engine import RequestState
from adaspec.core.step import accepted_prefix


class TraceOracle:
    """Batched per step: `prepare` (the `OraclePolicy`'s prepare hook, before each plan) asks every drafter
    once for all requests (at the longest k), then the policy queries it per (request, drafter, k).
    Drafters' `propose` has no side effects."""

    def __init__(self, drafters: Mapping[str, Drafter], traces: Mapping[str, Trace], max_k: int) -> None:
        self.drafters, self.traces, self.max_k = drafters, traces, max_k
        self._acc: dict[tuple[str, str], int] = {}

    def prepare(self, states: Sequence[RequestState]) -> None:
        self._acc.clear()
        views = [st.view() for st in states]
        ks = [max(0, min(self.max_k, st.max_new_tokens - len(st.output) - 1)) for st in states]
        for name, d in self.drafters.items():
            drafts = d.propose(views, ks)
            for st, dr in zip(states, drafts):
                out = self.traces[st.request_id].output
                self._acc[(st.request_id, name)] = accepted_prefix(dr.tokens, out, len(st.output))

    def __call__(self, st: RequestState, drafter: str, k: int) -> int:
        return min(k, self._acc.get((st.request_id, drafter), 0))
