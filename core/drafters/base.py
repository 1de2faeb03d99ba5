"""The Drafter protocol: what every draft source (n-gram, suffix tree, EAGLE head, adaptive head) implements.

The engine owns the target model and the KV cache; a drafter only sees token ids (and, if it asks for them,
the target's hidden states of tokens the target has accepted). It proposes a *chain* of up to k tokens per
request, with a per-token confidence the controller can calibrate, and optionally the full draft distribution
q used for exact rejection sampling. A drafter that returns no distribution is treated as deterministic
(q = point mass on the drafted token), which is exact as long as its proposal does not depend on randomness.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol, Sequence, overload, runtime_checkable

import torch


class JoinedTokens(SequenceABC):
    """prompt + output as one read-only sequence without copying either (a server's live token arrays):
    building `list(prompt) + list(output)` for every request at every step costs O(context) per step."""

    __slots__ = ("prompt", "output")

    def __init__(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        self.prompt, self.output = prompt, output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i):
        n = len(self.prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(n + len(self.output))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            head = list(self.prompt[start:min(stop, n)]) if start < n else []
            return head + list(self.output[max(start - n, 0):max(stop - n, 0)])
        if i < 0:
            i += n + len(self.output)
        if not 0 <= i < n + len(self.output):
            raise IndexError("token index out of range")
        return int(self.prompt[i]) if i < n else int(self.output[i - n])

    def __iter__(self) -> Iterator[int]:
        yield from self.prompt
        yield from self.output


@dataclass
class DraftRequest:
    """Read-only view of one live request, handed to `Drafter.propose`.

    `tokens` is the whole sequence so far (prompt + emitted output); its last token is the one the draft
    continues from. `prompt_len` separates prompt from output. `tenant` groups requests that share a cache.
    """

    request_id: str
    tokens: Sequence[int]
    prompt_len: int
    tenant: str = "default"


@dataclass
class Draft:
    """A chain proposal for one request.

    tokens: drafted token ids, at most the k asked for (may be empty).
    confidence: one number in [0, 1] per drafted token: the drafter's own belief that the token is right
        (e.g. its softmax probability, or a match frequency). Uncalibrated; the controller calibrates it.
    q: optional [len(tokens), vocab] draft distribution each token was sampled from (sampling mode).
        None means the proposal is deterministic: q is a point mass on each token.
    """

    tokens: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    q: torch.Tensor | None = None
    #: Tokens the drafter computed before the policy trimmed this proposal (0: untrimmed, len(tokens)): what
    #: drafting it cost, verified or not.
    proposed: int = 0

    def __post_init__(self) -> None:
        if len(self.confidence) != len(self.tokens):
            raise ValueError(
                f"Draft has {len(self.tokens)} tokens but {len(self.confidence)} confidences"
            )
        if self.q is not None and self.q.shape[0] != len(self.tokens):
            raise ValueError(f"Draft q has {self.q.shape[0]} rows for {len(self.tokens)} tokens")

    def truncated(self, k: int) -> "Draft":
        """The first k tokens of this draft (used when the controller trims a proposal)."""
        q = None if self.q is None else self.q[:k]
        return Draft(list(self.tokens[:k]), list(self.confidence[:k]), q)


@dataclass
class Observation:
    """What the target accepted for one request in one step, handed to `Drafter.observe`.

    tokens: the token ids newly written to the target's KV cache this step (they were input to the target
        forward: the pending token(s) plus the accepted drafts), in order.
    hidden: [len(tokens), len(hidden_layers), hidden_size] target hidden states at those positions for the
        layers the drafter asked for (None when it asked for none).
    next_token: the token the target emitted after them (the bonus or the correction): the next draft root.
    """

    request_id: str
    tokens: list[int]
    hidden: torch.Tensor | None
    next_token: int


@runtime_checkable
class Drafter(Protocol):
    """A source of draft tokens. Implementations live in `adaspec.core.drafters` (over `DrafterBase`)."""

    name: str
    #: Target layers whose hidden states the drafter needs in `observe` (() = none). Index i means the output
    #: of decoder layer i (0-based); -1 means the final normed hidden state fed to the LM head.
    hidden_layers: tuple[int, ...]
    #: Version of the weights it drafts with (0: its initial weights; model-free drafters stay at 0). Whoever
    #: swaps weights in sets it, so every StepRecord carries the version its draft came from.
    weight_version: int
    #: True for a model drafter whose `propose` runs one forward per chain position over all the rows it drafts
    #: for (a head): its cost is mostly per position per step, shared by those rows, not per token.
    chain_forwards: bool

    def start(self, request: DraftRequest) -> None:
        """A request enters the batch (prompt known, nothing generated yet)."""

    def observe(self, observations: Sequence[Observation]) -> None:
        """The target has verified a step: accepted tokens (and hidden states if asked for)."""

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        """Up to ks[i] draft tokens continuing requests[i]; one Draft per request, in order."""

    def finish(self, request: DraftRequest) -> None:
        """A request is complete (its full output is in request.tokens); drop per-request state."""

    def share_with(self, drafters: Mapping[str, "Drafter"]) -> None:
        """The engine's other drafters, after all are built (see `DrafterBase.share_with`)."""

    def warm_up(self) -> None:
        """Compile and allocate what the first `propose` would (at server start-up, not on the first request)."""


class DrafterBase:
    """`Drafter` with the optional parts declared: no hidden states, version 0, no per-request state."""

    name: str = "drafter"
    hidden_layers: tuple[int, ...] = ()
    weight_version: int = 0
    chain_forwards: bool = False

    def start(self, request: DraftRequest) -> None:
        """A request enters the batch."""

    def observe(self, observations: Sequence[Observation]) -> None:
        """The target has verified a step."""

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        raise NotImplementedError

    def finish(self, request: DraftRequest) -> None:
        """A request is complete."""

    def share_with(self, drafters: Mapping[str, "Drafter"]) -> None:
        """The other drafters of the same engine, once, after all are built: a drafter that can reuse one of
        them (the adapted static head reuses the static drafter's cache) binds to it here."""

    def warm_up(self) -> None:
        """Nothing to compile or allocate ahead of the first proposal."""
