"""The hindsight oracle's view of a step: how much of each drafter's proposal the recorded answer accepts."""

from __future__ import annotations

from typing import Mapping, Sequence

from adaspec.core.controller.baselines import OraclePolicy
from adaspec.core.drafters.base import Drafter
from adaspec.core.drift.traces import Trace
from adaspec.core.engine.engine import Plan, RequestState


def accepted_prefix(draft: Sequence[int], output: Sequence[int], n: int) -> int:
    """Length of the draft's prefix that matches output[n:] (greedy verification against a trace)."""
    a = 0
    while a < len(draft) and n + a < len(output) and draft[a] == output[n + a]:
        a += 1
    return a


class TraceOracle:
    """Batched per step: `prepare` asks every drafter once for all requests (at the longest k), then the
    `OraclePolicy` queries it per (request, drafter, k). Drafters' `propose` has no side effects."""

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


class TraceOraclePolicy(OraclePolicy):
    """`OraclePolicy` whose oracle is prepared, batched, before each plan."""

    def __init__(self, oracle: TraceOracle, **kwargs) -> None:
        super().__init__(oracle=oracle, **kwargs)
        self.trace_oracle = oracle

    def plan(self, requests: Sequence[RequestState]) -> list[Plan]:
        self.trace_oracle.prepare(requests)  # at a prefill, drafters without state propose nothing
        return super().plan(requests)
