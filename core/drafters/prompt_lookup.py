"""Prompt-lookup drafting: continue the context the way it continued after the last earlier n-gram match.

Model-free and cheap; strong wherever the output copies the input (code edits, extraction, RAG).
"""

from __future__ import annotations

from typing import Sequence

import torch

from adaspec.core.drafters.base import Draft, DraftRequest, DrafterBase, Observation


class PromptLookupDrafter(DrafterBase):
    """Longest n-gram (max_ngram down to min_ngram) suffix match, most recent occurrence first."""

    name = "prompt-lookup"
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4, decay: float = 0.9) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.min_ngram, self.max_ngram, self.decay = min_ngram, max_ngram, decay

    def start(self, request: DraftRequest) -> None:
        return None

    def observe(self, observations: Sequence[Observation]) -> None:
        return None

    def finish(self, request: DraftRequest) -> None:
        return None

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        return [self._one(list(r.tokens), k) for r, k in zip(requests, ks)]

    def _one(self, tokens: list[int], k: int) -> Draft:
        if k <= 0 or len(tokens) < self.min_ngram + 1:
            return Draft()
        seq = torch.tensor(tokens, dtype=torch.long)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            pattern = seq[-n:]
            windows = seq[:-1].unfold(0, n, 1)  # every earlier n-gram that has a successor
            hits = (windows == pattern).all(dim=1).nonzero().flatten()
            if hits.numel() == 0:
                continue
            start = int(hits[-1]) + n  # most recent occurrence
            cont = tokens[start : start + k]
            if not cont:
                continue
            base = n / (n + 1)
            conf = [base * self.decay**j for j in range(len(cont))]
            return Draft(cont, conf)
        return Draft()
