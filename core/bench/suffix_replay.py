"""Exact offline replay of greedy speculative decoding, for drafters that need no hidden states.

Why: under greedy decoding the target's output does not depend on the drafts, so given a recorded output we
can replay what any token-only drafter would have had accepted, step by step, without running a model. The
resulting tau (tokens per target forward) is what the drafter would have achieved, exactly.

Project-wide convention: tau = len(output) / target forwards, where the prefill that produced output[0] counts
as one forward. Plain decoding therefore has tau == 1.0.

Engine protocol replayed per request: start (prompt only); observe for the prefill (tokens = prompt,
next_token = output[0]); then per step propose (context = prompt + output[:pos], up to k tokens), verification
against the output, observe (tokens = the verify forward's kept inputs: the pending token plus the accepted
drafts, next_token = the token emitted after them); finally finish (full sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from adaspec.core.drafters.base import Drafter, DraftRequest, Observation


@dataclass(frozen=True)
class ReplayResult:
    """steps: target forwards (the prefill included); tokens: output tokens emitted; tau = tokens / steps."""

    steps: int
    tokens: int
    tau: float


@dataclass(frozen=True)
class ReplayRequest:
    """A recorded request: its prompt and the target's greedy output."""

    prompt: Sequence[int]
    output: Sequence[int]
    request_id: str = "replay"
    tenant: str = "default"


class _Decoding:
    """One request mid-replay: how much output is emitted and how many forwards it took."""

    def __init__(self, req: ReplayRequest) -> None:
        if not req.output:
            raise ValueError(f"request {req.request_id!r}: output needs at least one token (the prefill's)")
        self.req = req
        self.prompt = list(req.prompt)
        self.output = list(req.output)
        self.pos = 1  # the prefill emitted output[0]
        self.forwards = 1

    @property
    def done(self) -> bool:
        return self.pos >= len(self.output)

    def draft_request(self) -> DraftRequest:
        context = self.prompt + self.output[: self.pos]
        return DraftRequest(self.req.request_id, context, len(self.prompt), self.req.tenant)

    def full_request(self) -> DraftRequest:
        return DraftRequest(self.req.request_id, self.prompt + self.output, len(self.prompt), self.req.tenant)

    def prefill_observation(self) -> Observation:
        return Observation(self.req.request_id, list(self.prompt), None, self.output[0])

    def verify(self, draft: Sequence[int], k: int) -> Observation:
        """Accept the draft's longest prefix that matches the output, emit one more token, report it."""
        if len(draft) > k:
            raise ValueError(f"request {self.req.request_id!r}: {len(draft)} draft tokens for k={k}")
        out, pos, n = self.output, self.pos, len(self.output)
        accepted = 0
        while accepted < len(draft) and pos + accepted < n and draft[accepted] == out[pos + accepted]:
            accepted += 1
        new_pos = min(pos + accepted + 1, n)
        self.forwards += 1
        self.pos = new_pos
        # The KV cache now holds everything up to the last emitted token, which is the next draft root.
        return Observation(self.req.request_id, out[pos - 1 : new_pos - 1], None, out[new_pos - 1])

    def result(self) -> ReplayResult:
        n = len(self.output)
        return ReplayResult(steps=self.forwards, tokens=n, tau=n / self.forwards)


def _check(drafter: Drafter, k: int) -> None:
    if drafter.hidden_layers:
        raise ValueError(f"drafter {drafter.name!r} needs hidden states; it cannot be replayed offline")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def simulate_greedy(
    drafter: Drafter,
    prompt: Sequence[int],
    output: Sequence[int],
    k: int,
    request_id: str = "replay",
    tenant: str = "default",
) -> ReplayResult:
    """Replay one request through `drafter` the way an engine would, with the target's greedy `output`."""
    _check(drafter, k)
    dec = _Decoding(ReplayRequest(prompt, output, request_id, tenant))
    drafter.start(DraftRequest(request_id, list(dec.prompt), len(dec.prompt), tenant))
    drafter.observe([dec.prefill_observation()])
    while not dec.done:
        draft = drafter.propose([dec.draft_request()], [k])[0]
        drafter.observe([dec.verify(draft.tokens, k)])
    drafter.finish(dec.full_request())
    return dec.result()


def simulate_greedy_batch(
    drafter: Drafter, requests: Sequence[ReplayRequest], k: int, concurrency: int = 8
) -> list[ReplayResult]:
    """Replay requests in lockstep, up to `concurrency` at once, admitted in order as others finish.

    Why: with a shared cache, what a drafter sees depends on interleaving (a request finishing mid-way
    changes what the others can draft from). Each step: one propose call for all live requests, one observe
    call, then finishes, then admissions. Results come back in the order of `requests`.
    """
    _check(drafter, k)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    results: dict[int, ReplayResult] = {}
    pending = list(enumerate(requests))[::-1]
    live: list[tuple[int, _Decoding]] = []
    while pending or live:
        admitted = []
        while pending and len(live) < concurrency:
            i, req = pending.pop()
            dec = _Decoding(req)
            drafter.start(DraftRequest(req.request_id, list(dec.prompt), len(dec.prompt), req.tenant))
            admitted.append(dec.prefill_observation())
            live.append((i, dec))
        if admitted:
            drafter.observe(admitted)
        stepping = [(i, dec) for i, dec in live if not dec.done]
        if stepping:
            drafts = drafter.propose([dec.draft_request() for _, dec in stepping], [k] * len(stepping))
            drafter.observe([dec.verify(d.tokens, k) for (_, dec), d in zip(stepping, drafts)])
        still = []
        for i, dec in live:
            if dec.done:
                drafter.finish(dec.full_request())
                results[i] = dec.result()
            else:
                still.append((i, dec))
        live = still
    return [results[i] for i in range(len(requests))]
