"""Drafters used only by tests: they stress verification with controlled right/wrong proposals."""

from __future__ import annotations

import random
from typing import Sequence

import torch

from adaspec.core.drafters.base import Draft, DraftRequest, DrafterBase, Observation


class NoisyOracleDrafter(DrafterBase):
    """Proposes the true greedy continuation, corrupted at a random position, with random lengths.

    `reference` maps tuple(prompt) -> the plain greedy output, so every acceptance length 0..k occurs.
    """

    name = "noisy-oracle"
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, reference: dict[tuple[int, ...], list[int]], vocab: int, seed: int = 0) -> None:
        self.reference, self.vocab, self.rng = reference, vocab, random.Random(seed)

    def start(self, request: DraftRequest) -> None: ...
    def observe(self, observations: Sequence[Observation]) -> None: ...
    def finish(self, request: DraftRequest) -> None: ...

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        out = []
        for r, k in zip(requests, ks):
            ref = self.reference[tuple(r.tokens[: r.prompt_len])]
            pos = len(r.tokens) - r.prompt_len
            n = self.rng.randint(0, k)
            toks = list(ref[pos : pos + n])
            if toks and self.rng.random() < 0.5:
                j = self.rng.randrange(len(toks))
                toks[j] = (toks[j] + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
            out.append(Draft(toks, [0.5] * len(toks)))
        return out


class RecordingDrafter(DrafterBase):
    """Proposes nothing; records what the engine tells it, to check the observe/finish contract."""

    name = "recorder"

    def __init__(self, hidden_layers: tuple[int, ...] = ()) -> None:
        self.hidden_layers = hidden_layers
        self.started: list[str] = []
        self.finished: dict[str, list[int]] = {}
        self.kv_tokens: dict[str, list[int]] = {}
        self.next_tokens: dict[str, list[int]] = {}
        self.hidden_shapes: list[tuple[int, ...]] = []

    def start(self, request: DraftRequest) -> None:
        self.started.append(request.request_id)

    def observe(self, observations: Sequence[Observation]) -> None:
        for o in observations:
            self.kv_tokens.setdefault(o.request_id, []).extend(o.tokens)
            self.next_tokens.setdefault(o.request_id, []).append(o.next_token)
            if o.hidden is not None:
                assert o.hidden.shape[0] == len(o.tokens)
                self.hidden_shapes.append(tuple(o.hidden.shape))

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        return [Draft() for _ in requests]

    def finish(self, request: DraftRequest) -> None:
        self.finished[request.request_id] = list(request.tokens)


class SampledQDrafter(DrafterBase):
    """Samples each draft token from a fixed distribution q (its own RNG) and reports q: tests the full-q path."""

    name = "sampled-q"
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, q: torch.Tensor, seed: int = 0) -> None:
        self.q = q / q.sum()
        self.gen = torch.Generator().manual_seed(seed)

    def start(self, request: DraftRequest) -> None: ...
    def observe(self, observations: Sequence[Observation]) -> None: ...
    def finish(self, request: DraftRequest) -> None: ...

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        out = []
        for _, k in zip(requests, ks):
            toks = torch.multinomial(self.q, k, replacement=True, generator=self.gen).tolist() if k else []
            out.append(Draft(toks, [float(self.q[t]) for t in toks], self.q.expand(k, -1).clone()))
        return out
