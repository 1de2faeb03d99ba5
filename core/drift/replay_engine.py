"""Exact replay of the engine on recorded greedy traces: the same drafters, policies and step loop, no model.

`TraceEngine` is a `SpecEngine` whose forward and verify stages read the target's answer from the request's
trace instead of running the target: accepted = the longest prefix of the draft that matches the recorded
output, the next token is the recorded one, and drafters observe the recorded hidden states of exactly the
positions a live verify would have kept. Everything else -- planning, drafting (real drafter code),
trimming, committing (EOS/budget handling, records, observations, feedback), admission and retirement -- is
the engine's own code, so a replayed policy does what it would do live, step for step. The verify time in
each StepRecord is modeled (`verify_time(tokens, batch)`), which keeps the controller's cost inputs, and
thus its decisions, deterministic.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from adaspec.core.drafters.base import Draft, Drafter
from adaspec.core.drift.traces import Trace
from adaspec.core.engine import ragged
from adaspec.core.engine.engine import Forward, RequestState, SpecEngine, Verdict
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.errors import RequestError
from adaspec.core.step import PolicyBase, accepted_prefix, forward_tokens


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
        verify_time: Callable[[int, int, bool], float],  # (tokens, batch, any draft) -> seconds
        batch_size: int = 4,
        padded_verify: bool = True,
        verify_multiple: int | None = None,
    ) -> None:
        super().__init__(target, drafters, batch_size=batch_size, ragged_verify=False)
        self.verify_time = verify_time
        #: Model the reference engine's padded verify or a ragged one (measured costs, a GPU profile, SGLang),
        #: a packed forward filled up to `verify_multiple` tokens (default: the reference engine's when ragged).
        self.padded_verify = padded_verify
        self.verify_multiple = (verify_multiple if verify_multiple is not None
                                else 1 if padded_verify else ragged.PACK_MULTIPLE)
        self.traces: dict[str, Trace] = {}

    def generate(self, requests, params: SamplingParams, policy: PolicyBase):
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

    def _forward(self, states: Sequence[RequestState], drafts: Sequence[Draft], kv) -> Forward:  # type: ignore[override]
        """No model: only the chunk shape (for the modeled verify time)."""
        chunks = [st.pending + d.tokens for st, d in zip(states, drafts)]
        pend = torch.tensor([len(st.pending) for st in states], dtype=torch.long)
        dlen = torch.tensor([len(d.tokens) for d in drafts], dtype=torch.long)
        return Forward(chunks, pend, dlen, max(len(c) for c in chunks), None, None, 0.0)

    def _verify(self, states: Sequence[RequestState], drafts: Sequence[Draft], fwd: Forward,  # type: ignore[override]
                kv) -> Verdict:
        """Accepted = the draft's prefix matching the recorded output; kept hidden rows from the trace."""
        spec = bool(int(fwd.dlen.max()) > 0)
        tokens = forward_tokens([len(c) for c in fwd.chunks], self.padded_verify, self.verify_multiple, spec)
        verify_s = self.verify_time(tokens, len(states), spec)
        accepted, next_tokens, kept, hidden = [], [], [], []
        for i, st in enumerate(states):
            trace = self.traces.get(st.request_id)
            if trace is None:
                raise RequestError(f"no trace for request {st.request_id!r}")
            out, n, draft = trace.output, len(st.output), drafts[i].tokens
            a = accepted_prefix(draft, out, n)
            # Past a recorded EOS the target's next token is never emitted (_emit stops at EOS): pad it.
            accepted.append(a)
            next_tokens.append(out[n + a] if n + a < len(out) else self.pad_id)
            start = len(st.spec.prompt) + n - len(st.pending)
            rows = trace.hidden[start : start + len(st.pending) + a]  # [kept, L_trace, d]
            kept.append((st.pending + draft[:a])[: len(rows)])
            hidden.append(rows[:, self._layer_index(trace)] if self.hidden_layers else None)
        return Verdict(accepted, next_tokens, kept, hidden, verify_s)
