"""The `adaptive` drafter: an `AdaptiveHead` drafting from the target's final hidden state, learning online.

State per request is tiny: the target's final normed hidden at the last committed position and the token
the target emitted after it (the draft root). With `collect > 0` the drafter also keeps each finished
request's (hidden, tokens) stream as training experience (output positions only, capped at `collect`
samples), which `take_experience` hands to `AdaptiveHead.learn` (in-process, or later via the sidecar).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from adaspec.core.drafters.base import Draft, DraftRequest, DrafterBase, Observation
from adaspec.core.heads.adaptive import AdaptiveFeatures, AdaptiveHead, features_from_stream


@dataclass
class _Stream:
    prompt_len: int
    hidden: Tensor | None = None  # [d] at the last committed position
    next_token: int = -1
    committed: int = 0
    rows: list[Tensor] = field(default_factory=list)  # experience: hidden rows from position `first` on
    tokens: list[int] = field(default_factory=list)
    first: int = 0


class AdaptiveDrafter(DrafterBase):
    """Drafter protocol over an `AdaptiveHead`; greedy chains, confidence = the head's softmax probability."""

    hidden_layers: tuple[int, ...] = (-1,)
    chain_forwards = True

    def __init__(self, head: AdaptiveHead, name: str = "adaptive", collect: int = 0, unroll: int = 3) -> None:
        self.name = name
        self.head = head.eval()
        self.states: dict[str, _Stream] = {}
        self.collect, self.unroll = collect, unroll
        self.experience: deque[tuple[AdaptiveFeatures, Tensor]] = deque()
        self._buffered = 0
        #: If set, each finished request's samples go here (request id, features, targets) instead of the
        #: buffer: an in-process trainer (the drift benchmark) takes them as they come.
        self.on_experience: Callable[[str, AdaptiveFeatures, Tensor], None] | None = None


    @torch.inference_mode()
    def warm_up(self) -> None:
        """One throw-away draft step: the first `draft_topk` call JIT-compiles its Triton kernel on a GPU,
        which would otherwise stall the first request that drafts (inside a server, the scheduler thread)."""
        w = self.head.embed_weight
        self.head.draft(torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device),
                        torch.zeros(1, dtype=torch.long, device=w.device), 1)

    def start(self, request: DraftRequest) -> None:
        st = _Stream(request.prompt_len)
        st.first = max(0, request.prompt_len - 2)  # first sample whose target (t+2) is an output token
        self.states[request.request_id] = st

    @torch.inference_mode()
    def observe(self, observations: Sequence[Observation]) -> None:
        for o in observations:
            st = self.states.get(o.request_id)
            if st is None or o.hidden is None or not o.tokens:
                continue
            h = o.hidden[:, 0]  # [n, d]
            st.hidden, st.next_token = h[-1], o.next_token
            if self.collect:
                lo = max(0, st.first - st.committed)
                if lo < len(o.tokens):
                    st.rows.append(h[lo:].detach().to("cpu", torch.float32))
                    st.tokens.extend(o.tokens[lo:])
            st.committed += len(o.tokens)

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        drafts = [Draft() for _ in requests]
        live = [i for i, r in enumerate(requests) if ks[i] > 0 and self._ready(r.request_id)]
        if not live:
            return drafts
        dev = self.head.up.weight.device
        sts = [self.states[requests[i].request_id] for i in live]
        h = torch.stack([st.hidden for st in sts]).to(dev)
        tok = torch.tensor([st.next_token for st in sts], device=dev)
        ids, probs = self.head.draft(h, tok, max(ks[i] for i in live))
        for j, i in enumerate(live):
            drafts[i] = Draft(ids[j, : ks[i]].tolist(), probs[j, : ks[i]].tolist())
        return drafts

    def finish(self, request: DraftRequest) -> None:
        st = self.states.pop(request.request_id, None)
        if st is None or not self.collect or not st.rows:
            return
        hidden = torch.cat(st.rows)
        feats, targets = features_from_stream(hidden, st.tokens + [st.next_token], self.unroll)
        if len(feats) == 0:
            return
        if self.on_experience is not None:
            self.on_experience(request.request_id, feats, targets)
            return
        self.experience.append((feats, targets))
        self._buffered += len(feats)
        while self._buffered > self.collect and len(self.experience) > 1:
            self._buffered -= len(self.experience.popleft()[0])

    def take_experience(self) -> tuple[AdaptiveFeatures, Tensor] | None:
        """All buffered samples as one batch (and clear the buffer), or None."""
        if not self.experience:
            return None
        feats = [f for f, _ in self.experience]
        targets = torch.cat([t for _, t in self.experience])
        batch = AdaptiveFeatures(torch.cat([f.hidden for f in feats]), torch.cat([f.tokens for f in feats]))
        self.experience.clear()
        self._buffered = 0
        return batch, targets

    def _ready(self, request_id: str) -> bool:
        st = self.states.get(request_id)
        return st is not None and st.hidden is not None
