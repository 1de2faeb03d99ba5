"""Greedy traces: the target's answer to each prompt plus the hidden states every drafter reads, on disk.

Under greedy decoding the target's output does not depend on what was drafted, so one recording per prompt
is enough to replay any policy exactly. A trace is keyed by the model's weights fingerprint, the prompt's
token ids, the generation budget and the recorded layers; it is stored float32 (what the live engine's
drafters see) as one safetensors file, written atomically, so an interrupted recording loses nothing done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from torch import Tensor

from adaspec.core import fsio
from adaspec.core.engine.recording import model_fingerprint, record_greedy

TRACE_FORMAT = 1
#: Budgets whose recordings also serve shorter requests (the benchmarks' usual 128 serves --quick's 48).
_LONGER_BUDGETS = (64, 128, 192, 256, 512, 1024)


@dataclass
class Trace:
    """tokens = prompt + greedy output; hidden[t] = the recorded layers at position t (t < len(tokens) - 1)."""

    tokens: list[int]
    prompt_len: int
    hidden: Tensor  # [T-1, L, d] float32
    layers: tuple[int, ...]

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def trace_layers(settings: Any, target: Any) -> list[int]:
    """The layers every trace records: what the static and the adaptive heads read (one trace serves all)."""
    from adaspec.core.drafters.registry import make_drafter

    layers: set[int] = set()
    for name in ("static", "adaptive"):
        layers.update(make_drafter(name, settings, target).hidden_layers)
    return sorted(layers)


def trace_key(fingerprint: str, prompt: Sequence[int], max_new_tokens: int, layers: Sequence[int]) -> str:
    h = hashlib.sha256(json.dumps({"format": TRACE_FORMAT, "weights": fingerprint, "prompt": list(prompt),
                                   "max_new_tokens": max_new_tokens, "layers": sorted(layers)}).encode())
    return h.hexdigest()[:24]


class TraceStore:
    """Traces of one target under `root/<model fingerprint>/`; `ensure` records only what is missing."""

    def __init__(self, root: Path, target: Any) -> None:
        self.target = target
        self.fingerprint = model_fingerprint(target)
        self.dir = Path(root) / self.fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, prompt: Sequence[int], max_new_tokens: int, layers: Sequence[int]) -> Path:
        return self.dir / f"{trace_key(self.fingerprint, prompt, max_new_tokens, layers)}.safetensors"

    def load(self, prompt: Sequence[int], max_new_tokens: int, layers: Sequence[int]) -> Trace | None:
        """The trace for this budget, or the prefix of a longer-budget one (greedy decoding is causal)."""
        for budget in [max_new_tokens, *(b for b in _LONGER_BUDGETS if b > max_new_tokens)]:
            path = self.path(prompt, budget, layers)
            if path.is_file():
                return self._read(path, max_new_tokens)
        return None

    @staticmethod
    def _read(path: Path, max_new_tokens: int) -> Trace:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tokens = f.get_tensor("tokens").tolist()
            hidden = f.get_tensor("hidden")
        plen = int(meta["prompt_len"])
        if len(tokens) - plen > max_new_tokens:  # a longer recording: its first max_new_tokens are this one
            tokens = tokens[: plen + max_new_tokens]
            hidden = hidden[: len(tokens) - 1]
        return Trace(tokens, plen, hidden, tuple(json.loads(meta["layers"])))

    def ensure(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, layers: Sequence[int],
        batch_size: int = 8, progress: Any = None,
    ) -> list[Trace]:
        """Every prompt's trace, recording the missing ones with the engine's plain (`none`) decoding."""
        layers = tuple(sorted(set(layers)))
        if not layers:
            raise ValueError("a trace records at least one layer")
        missing = [i for i, p in enumerate(prompts) if self.load(p, max_new_tokens, layers) is None]
        task = progress.add_task("recording greedy traces", total=len(missing)) if progress and missing else None
        todo = [prompts[i] for i in missing]
        for idx, answers in record_greedy(self.target, todo, layers, max_new_tokens, torch.float32, batch_size,
                                          chunk=batch_size * 4):
            for j, (tokens, plen, hidden) in zip(idx, answers):
                self._write(todo[j], max_new_tokens, layers, tokens, plen, hidden)
            if task is not None:
                progress.advance(task, len(idx))
        out = []
        for p in prompts:
            tr = self.load(p, max_new_tokens, layers)
            if tr is None:
                raise RuntimeError("a trace vanished while recording (cache dir shared with a cleaner?)")
            out.append(tr)
        return out

    def _write(self, prompt: Sequence[int], max_new_tokens: int, layers: tuple[int, ...], tokens: list[int],
               prompt_len: int, hidden: Tensor) -> None:
        fsio.save_safetensors({"tokens": torch.tensor(tokens, dtype=torch.int64), "hidden": hidden.contiguous()},
                              self.path(prompt, max_new_tokens, layers),
                              {"prompt_len": str(prompt_len), "layers": json.dumps(list(layers)),
                               "max_new_tokens": str(max_new_tokens)})
