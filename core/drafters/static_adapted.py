"""The `adaptive` drafter of kind `adapter`: the static head plus an online-trained `StaticAdapter`.

It drafts from the static drafter's own per-request cache (the adapter leaves keys and values alone), so when
both run in one engine (`share_with`) the committed positions are extended once and the adaptive drafter pays
only its own chain: one recomputed query row at the draft root plus k-1 adapted head steps. Alone, it keeps a
private static drafter over the same head. With `collect`, each finished request's stream -- the target
features at every committed position (prompt included) and its tokens -- goes to `on_experience`, the
learner's input (`adaspec.sidecar.adapter_learner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from adaspec.core.drafters.base import Draft, DraftRequest, DrafterBase, Observation
from adaspec.core.drafters.eagle3 import Eagle3Drafter
from adaspec.core.heads.static_adapter import StaticAdapter


@dataclass
class AdapterStream:
    """One finished request as training data: aux [T, width] (bf16) at positions 0..T-1, tokens [T+1]."""

    request_id: str
    tenant: str
    prompt_len: int
    aux: Tensor
    tokens: Tensor

    def __len__(self) -> int:
        return int(self.aux.shape[0])


@dataclass
class _Collect:
    tenant: str
    prompt_len: int
    rows: list[Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    next_token: int = -1


class AdaptedStaticDrafter(DrafterBase):
    """Greedy chains of the static head with the adapter's deltas; confidence = the adapted softmax prob."""

    chain_forwards = True

    def __init__(self, base: Eagle3Drafter, adapter: StaticAdapter, name: str = "adaptive",
                 collect: int = 0, max_stream: int = 4096) -> None:
        self.name = name
        self.base, self.adapter = base, adapter.eval()
        self.owns_base = True
        self.hidden_layers = base.hidden_layers
        self.collect, self.max_stream = collect, max_stream
        self._collect: dict[str, _Collect] = {}
        #: Finished streams go here (the learner); without it they are dropped.
        self.on_experience: Callable[[AdapterStream], None] | None = None

    def share_with(self, drafters: Mapping[str, object]) -> None:
        """Draft from the engine's static drafter's cache when it runs the same head (one catch-up for both):
        the adapter then reads that drafter's head (equal weights, checked), and this drafter's private copy
        of the head is dropped."""
        other = drafters.get("static")
        mine = self.adapter.head
        if not isinstance(other, Eagle3Drafter) or other is self.base:
            return
        theirs = other.head
        same = theirs is mine or (theirs.cfg == mine.cfg and all(
            torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), mine.state_dict().values())))
        if same and not self._collect and not self.base.states:  # before any request: nothing to migrate
            object.__setattr__(self.adapter, "head", theirs)
            self.base, self.owns_base = other, False

    def start(self, request: DraftRequest) -> None:
        if self.owns_base:
            self.base.start(request)
        if self.collect:
            self._collect[request.request_id] = _Collect(request.tenant, request.prompt_len)

    @torch.inference_mode()
    def observe(self, observations: Sequence[Observation]) -> None:
        if self.owns_base:
            self.base.observe(observations)
        if not self.collect:
            return
        width = self.adapter.head.fc.in_features
        for o in observations:
            c = self._collect.get(o.request_id)
            if c is None or o.hidden is None or not o.tokens:
                continue
            if len(c.tokens) + len(o.tokens) > self.max_stream:  # bounded memory: a very long request stops collecting
                continue
            c.rows.append(o.hidden.reshape(len(o.tokens), width).to("cpu", torch.bfloat16, copy=True))
            c.tokens.extend(o.tokens)
            c.next_token = o.next_token

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        return self.base.propose_with(requests, ks, self.adapter)

    def finish(self, request: DraftRequest) -> None:
        if self.owns_base:
            self.base.finish(request)
        c = self._collect.pop(request.request_id, None)
        if c is None or not c.rows or self.on_experience is None:
            return
        stream = AdapterStream(request.request_id, c.tenant, c.prompt_len, torch.cat(c.rows),
                               torch.tensor(c.tokens + [c.next_token], dtype=torch.long))
        self.on_experience(stream)
