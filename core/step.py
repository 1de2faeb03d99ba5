"""The shared vocabulary of one speculative step, for every engine (reference, trace replay, SGLang glue).

A step is: the policy plans (drafter, k) per request, cheap drafters it *peeks* at propose first so the plan
can read this step's actual drafts, the chosen drafters propose chains (`propose_chains`: the one draft/trim
loop), the target verifies, and one `StepRecord` per request goes back to the policy (`feedback`), to the
logs and to the metrics. `PolicyBase` declares every hook an engine may call, with no-op defaults, so
engines call hooks and never probe for them (as SGLang's `base_spec_worker.py` declares its worker hooks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import torch

from adaspec.core.drafters.base import Draft, Drafter, DraftRequest
from adaspec.core.errors import RequestError

if TYPE_CHECKING:
    from adaspec.core.engine.profile import StepProfile


@dataclass(frozen=True)
class Plan:
    """What the policy decided for one request this step: which drafter, how many tokens (0 = none)."""

    drafter: str | None
    k: int


@dataclass
class StepRecord:
    """One request's part of one target forward: the unit every policy, log and benchmark is built on.

    The same field names cross the wire to the sidecar (`adaspec.core.online.wire.StepEntry`)."""

    step: int
    request_id: str
    tenant: str
    drafter: str | None
    k: int  # lookahead the policy planned
    drafted: int  # draft tokens verified (after clipping and trimming)
    accepted: int  # of those, accepted
    emitted: int  # tokens the request gained (accepted + the bonus/correction, cut at EOS/budget)
    confidence: list[float]  # [drafted] the drafter's own per-token confidences
    batch_size: int
    chunk_tokens: int  # tokens this request fed the forward (pending + drafted)
    draft_s: float  # the batch's peek + drafting time
    verify_s: float  # the batch's verify forward time
    prefill: bool
    #: The batch's step time outside drafting and verifying (planning, observe, feedback, logging, weight
    #: swaps), as measured on the previous decode step: what a step costs on top of the cost model's forward.
    overhead_s: float = 0.0
    #: Token ids behind the counts (what the sidecar trains on).
    draft_tokens: list[int] = field(default_factory=list)  # [drafted]
    emitted_tokens: list[int] = field(default_factory=list)  # [emitted]
    #: Weight version of the drafter that drafted this step (0: initial weights, or a model-free drafter).
    weight_version: int = 0
    #: Draft tokens the drafter computed for this request (>= drafted: more when the policy trimmed them, or
    #: kept an exploration draft out of the forward); what the step's drafting cost. 0: as drafted.
    proposed: int = 0
    #: [kept, L, d] target hidden states of the kept positions, only when the engine records features.
    features: torch.Tensor | None = field(default=None, repr=False, compare=False)


class PlanRequest(Protocol):
    """What a policy reads of a live request (the engine's `RequestState`, the SGLang runtime's `ReqView`)."""

    request_id: str
    tenant: str
    max_new_tokens: int
    output: Sequence[int]  # tokens generated so far
    pending: Sequence[int]  # tokens the next forward feeds before any draft (the draft root is the last)


class PolicyBase:
    """Decides drafter and lookahead per request and step, and learns from the records of each step.

    `plan` and `feedback` are the contract; the other hooks have no-op defaults that an engine always calls:
    a policy overrides only what it uses.
    """

    #: Drafters the engine asks for every request before `plan` (then calls `peeked`); () = none.
    peek: tuple[str, ...] = ()
    #: Tokens each peeked drafter proposes (clipped per request by the engine).
    peek_k: int = 0
    #: The batch goodput (tokens/s) the last plan expects; 0.0 for policies that do not model it.
    lam: float = 0.0

    def plan(self, requests: Sequence[PlanRequest]) -> list[Plan]:
        raise NotImplementedError

    def feedback(self, records: Sequence[StepRecord]) -> None:
        """The verified step, one record per planned request."""

    def peeked(self, drafter: str, requests: Sequence[PlanRequest], drafts: Sequence[Draft]) -> None:
        """This step's proposals of a drafter named in `peek`, one per request, before `plan`."""

    def trim(self, request: DraftRequest, drafter: str, draft: Draft) -> int:
        """How many leading tokens of a non-empty proposal to verify (called right after `propose`)."""
        return len(draft.tokens)

    def finish(self, request_id: str) -> None:
        """A request left the batch: drop its per-request state."""

    def set_available(self, drafter: str, available: bool) -> None:
        """Allow or forbid a drafter from outside (the online-learned one while its sidecar is silent)."""

    def set_padded_verify(self, padded: bool, multiple: int = 1) -> None:
        """The engine says how it verifies: right-padded chunks (a step costs batch x its widest chain) or
        ragged (tokens summed), a packed ragged forward filled up to a multiple of `multiple` tokens (the
        reference engine on this CPU's GEMM kernels; 1 for SGLang). Called when a batch starts."""


class FixedPolicy(PolicyBase):
    """Always the same drafter and k (the baseline; k is clipped per request by the engine)."""

    def __init__(self, drafter: str | None, k: int) -> None:
        self.drafter = None if drafter in (None, "none") or k == 0 else drafter
        self.k = k if self.drafter else 0

    def plan(self, requests: Sequence[PlanRequest]) -> list[Plan]:
        return [Plan(self.drafter, self.k) for _ in requests]


def peek_drafts(
    policy: PolicyBase, drafters: Mapping[str, Drafter], rows: Sequence[PlanRequest],
    requests: Sequence[DraftRequest], ks: Sequence[int], profile: "StepProfile | None" = None,
) -> dict[str, list[Draft]]:
    """Each drafter the policy peeks proposes up to ks[i] tokens for every row; the policy sees them
    (`policy.peeked`) before it plans. Returns the proposals by drafter, for `propose_chains` to reuse."""
    out: dict[str, list[Draft]] = {}
    if not any(ks):
        return out
    for name in policy.peek:
        drafter = drafters.get(name)
        if drafter is None:
            continue
        t0 = time.perf_counter()
        drafts = [d.truncated(ks[i]) if len(d.tokens) > ks[i] else d
                  for i, d in enumerate(drafter.propose(requests, ks))]
        out[name] = drafts
        policy.peeked(name, rows, drafts)
        if profile is not None:
            profile.add(f"peek:{name}", time.perf_counter() - t0)
    return out


def propose_chains(
    policy: PolicyBase, drafters: Mapping[str, Drafter], names: Sequence[str | None], ks: Sequence[int],
    requests: Sequence[DraftRequest], peeked: Mapping[str, list[Draft]] | None = None,
    profile: "StepProfile | None" = None,
) -> list[Draft]:
    """The one draft/trim loop: each drafter proposes, batched, for the requests assigned to it (names[i],
    up to ks[i] tokens; none or k 0: an empty draft); the policy trims each proposal before verification.
    A drafter already asked this step (`peeked`) is not asked again. Returns one Draft per request, in order."""
    drafts = [Draft() for _ in requests]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None and ks[i] > 0:
            groups.setdefault(name, []).append(i)
    for name, idx in groups.items():
        drafter = drafters.get(name)
        if drafter is None:
            raise RequestError(f"policy chose unknown drafter {name!r}")
        t0 = time.perf_counter()
        if peeked and name in peeked:
            proposals = [peeked[name][i] for i in idx]
        else:
            proposals = drafter.propose([requests[i] for i in idx], [ks[i] for i in idx])
        t1 = time.perf_counter()
        for i, d in zip(idx, proposals):
            if len(d.tokens) > ks[i]:
                d = d.truncated(ks[i])
            if d.tokens:
                n = int(policy.trim(requests[i], name, d))
                if n < len(d.tokens):
                    full = len(d.tokens)
                    d = d.truncated(max(0, n))
                    d.proposed = full
            drafts[i] = d
        if profile is not None:
            profile.add(f"draft:{name}", t1 - t0)
            profile.add("trim", time.perf_counter() - t1)
    return drafts


def forward_tokens(chunk_lens: Sequence[int], padded: bool, multiple: int = 1, spec: bool = False) -> int:
    """Tokens one verify forward computes over chunks of these lengths: padded, batch x the widest chunk;
    ragged, their sum, filled up to a multiple of `multiple` when the forward runs packed (it verifies a
    draft, `spec`, or the chunks differ in length) -- what `SpecEngine._forward` does."""
    if not chunk_lens:
        return 0
    widest = max(chunk_lens)
    if padded:
        return len(chunk_lens) * widest
    tokens = sum(chunk_lens)
    if multiple > 1 and (spec or tokens < len(chunk_lens) * widest):
        tokens = -(-tokens // multiple) * multiple
    return tokens


def accepted_prefix(draft: Sequence[int], output: Sequence[int], n: int) -> int:
    """Length of the draft's prefix that matches output[n:] (greedy verification against a known answer)."""
    a = 0
    while a < len(draft) and n + a < len(output) and draft[a] == output[n + a]:
        a += 1
    return a

