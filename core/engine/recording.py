"""The target's own greedy answers with the hidden states drafters read: the one recorder.

Static-head training data (`adaspec.core.heads.train_static`) and the benchmarks' exact-replay traces
(`adaspec.core.drift.traces`) are both "what the target answers under plain greedy decoding, and its hidden
states at every position": `record_greedy` runs the reference engine with no drafting and a `HiddenRecorder`
(a drafter that never drafts) collecting them, continuously batched.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from adaspec.core.drafters.base import Draft, DrafterBase, DraftRequest, Observation
from adaspec.core.engine.engine import RequestSpec, SpecEngine
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.step import FixedPolicy


class HiddenRecorder(DrafterBase):
    """A drafter that never drafts: it stores each request's tokens and the hidden states it asked for."""

    name = "recorder"

    def __init__(self, layers: tuple[int, ...], dtype: torch.dtype) -> None:
        self.hidden_layers = tuple(sorted(layers))  # the engine's union is exactly this sorted tuple
        self.dtype = dtype
        self.rows: dict[str, list[Tensor]] = {}
        self.done: dict[str, tuple[list[int], int, Tensor]] = {}

    def start(self, request: DraftRequest) -> None:
        self.rows[request.request_id] = []

    def observe(self, observations: Sequence[Observation]) -> None:
        for o in observations:
            if o.hidden is not None and o.request_id in self.rows:
                self.rows[o.request_id].append(o.hidden.detach().to("cpu", self.dtype))

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        return [Draft() for _ in requests]

    def finish(self, request: DraftRequest) -> None:
        hidden = torch.cat(self.rows.pop(request.request_id))
        tokens = list(request.tokens)
        # every token but the last went through the target; cut anything a stop left past it
        hidden = hidden[: len(tokens) - 1]
        if hidden.shape[0] != len(tokens) - 1:
            raise RuntimeError(f"{request.request_id}: {hidden.shape[0]} hidden rows for {len(tokens)} tokens")
        self.done[request.request_id] = (tokens, request.prompt_len, hidden)


def record_greedy(
    target: Any, prompts: Sequence[Sequence[int]], layers: Sequence[int], max_new_tokens: int,
    dtype: torch.dtype = torch.float32, batch_size: int = 8, chunk: int = 32,
) -> Iterator[tuple[list[int], list[tuple[list[int], int, Tensor]]]]:
    """Plain greedy decoding of `prompts`, `chunk` at a time (each chunk continuously batched at `batch_size`):
    yields (indices into prompts, [(tokens = prompt + output, prompt_len, hidden [len(tokens)-1, L, d])])
    per chunk, so a caller can store each chunk as it completes (resumable recordings)."""
    layers = tuple(sorted(set(layers)))
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for lo in range(0, len(prompts), chunk):
        idx = list(range(lo, min(lo + chunk, len(prompts))))
        rec = HiddenRecorder(layers, dtype)
        engine = SpecEngine(target, [rec], batch_size=batch_size)
        specs = [RequestSpec(list(prompts[i]), f"rec-{i}") for i in idx]
        engine.generate(specs, params, FixedPolicy(None, 0))
        yield idx, [rec.done[s.request_id] for s in specs]


def model_fingerprint(target: Any) -> str:
    """Identifies the target's weights cheaply: config + a slice of the embedding's bytes."""
    emb = target.model.get_input_embeddings().weight
    h = hashlib.sha256(json.dumps(target.model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(emb.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
