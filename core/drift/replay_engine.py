"""Exact replay of the engine on recorded greedy traces: the same drafters, policies and step loop, no model.

`TraceEngine` is a `SpecEngine` whose verify step reads the target's answer from the request's trace instead
of running the target: accepted = the longest prefix of the draft that matches the recorded output, the next
token is the recorded one, and drafters observe the recorded hidden states of exactly the positions a live
verify would have kept. Everything else -- planning, drafting (real drafter code), trimming, EOS/budget
handling, admission and retirement -- is the engine's own code, so a replayed policy does what it would do
live, step for step. The verify time in each StepRecord is modeled (`verify_time(tokens, batch)`), which
keeps the controller's cost inputs, and thus its decisions, deterministic.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch

from adaspec.core.drafters.base import Drafter, Observation
from adaspec.core.engine.engine import Policy, RequestState, SpecEngine, StepRecord
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.errors import RequestError
from adaspec.core.drift.traces import Trace


class _NoKV:
    """Stands in for BatchKV: a replay keeps no cache (positions come from each request's own counts)."""

    batch_size = 0
    device = torch.device("cpu")

    def merge(self, other: "_NoKV") -> None:
        pass

    def select(self, keep: torch.Tensor) -> None:
        pass

    def maybe_compact(self, ratio: float) -> None:
        pass


class TraceEngine(SpecEngine):
    """`SpecEngine` over traces: set `traces[request_id]` for every request before `generate` (greedy only)."""

    def __init__(
        self,
        target,
        drafters: Mapping[str, Drafter] | Sequence[Drafter],
        verify_time: Callable[[int, int], float],
        batch_size: int = 4,
    ) -> None:
        super().__init__(target, drafters, batch_size=batch_size)
        self.verify_time = verify_time
        self.traces: dict[str, Trace] = {}

    def generate(self, requests, params: SamplingParams, policy: Policy):
        if not params.greedy:
            raise RequestError("trace replay is exact only for greedy decoding")
        return super().generate(requests, params, policy)

    def _new_kv(self) -> _NoKV:  # type: ignore[override]
        return _NoKV()

    def _layer_index(self, trace: Trace) -> list[int]:
        try:
            return [trace.layers.index(layer) for layer in self.hidden_layers]
        except ValueError:
            raise RequestError(f"trace lacks layers {self.hidden_layers} (has {trace.layers})") from None

    def _step(self, states: list[RequestState], kv, params: SamplingParams, policy: Policy, prefill: bool) -> None:
        kv_lens = [len(st.spec.prompt) + len(st.output) - len(st.pending) for st in states]
        plans, peeked, peek_s = self._plan(states, kv_lens, policy, prefill)
        drafts, names, draft_s = self._draft(states, plans, kv_lens, policy, peeked)
        draft_s += peek_s
        B = len(states)
        t0 = time.perf_counter()
        verify_s = self.verify_time(sum(len(st.pending) + len(d.tokens) for st, d in zip(states, drafts)), B)
        self.step_count += 1
        observations: list[Observation] = []
        records: list[StepRecord] = []
        for i, st in enumerate(states):
            trace = self.traces.get(st.request_id)
            if trace is None:
                raise RequestError(f"no trace for request {st.request_id!r}")
            out, n, draft = trace.output, len(st.output), drafts[i].tokens
            a = 0
            while a < len(draft) and n + a < len(out) and draft[a] == out[n + a]:
                a += 1
            # Past a recorded EOS the target's next token is never emitted (_emit stops at EOS): pad it.
            nxt = out[n + a] if n + a < len(out) else self.pad_id
            start = kv_lens[i]
            kept = st.pending + draft[:a]
            emitted = draft[:a] + [nxt]
            n_emitted = self._emit(st, emitted, kv_len=start + len(kept))
            st.forwards += 1
            rows = trace.hidden[start : start + len(kept)]
            hidden = rows[:, self._layer_index(trace)] if self.hidden_layers else None
            rec = StepRecord(
                step=self.step_count, request_id=st.request_id, tenant=st.spec.tenant, drafter=names[i],
                k=plans[i].k, drafted=len(draft), accepted=a, emitted=n_emitted,
                confidence=list(drafts[i].confidence), batch_size=B, chunk_tokens=len(st.pending) + len(draft),
                draft_s=draft_s, verify_s=verify_s, prefill=prefill,
                draft_tokens=list(draft), emitted_tokens=list(emitted[:n_emitted]),
            )
            if self.record_features and hidden is not None:
                rec.features = hidden
            st.records.append(rec)
            records.append(rec)
            observations.append(Observation(st.request_id, kept[: len(rows)], hidden, nxt))
            st.pending = [nxt]
        self.replay_overhead_s = time.perf_counter() - t0
        for d in self.drafters.values():
            d.observe(self._own_layers(d, observations))
        policy.feedback(records)
        for listener in self.step_listeners:
            listener(records)
