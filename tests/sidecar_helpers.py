"""Helpers of the sidecar tests: a tiny target the adaptive head can learn on, short IPC dirs, log capture."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.engine.engine import SpecEngine
from adaspec.core.heads.adaptive import AdaptiveHead
from adaspec.core.target import Target
from adaspec.core.online.settings import TransportSettings
from adaspec.core.online.wire import StepEntry, entry_from_record

VOCAB = 97


def chaotic_target(seed: int = 0) -> Target:
    """A tiny random Llama with large weights: its greedy continuations vary, so a drafter has to learn them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      initializer_range=0.3)
    return Target(LlamaForCausalLM(cfg).eval(), None, torch.device("cpu"), torch.float32, frozenset(), 256, "chaotic")


def templates(n: int = 4, length: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(n)]


def stream(tmpls: list[list[int]], n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [tmpls[rng.randrange(len(tmpls))] for _ in range(n)]


def short_dir(prefix: str = "as-") -> Path:
    """A short private dir under /tmp (IPC socket paths must fit in 107 bytes; pytest's tmp_path may not)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def transport_settings(root: Path) -> TransportSettings:
    return TransportSettings(run_dir=root / "run", request_timeout_ms=3000, resync_s=1.0, log_flush_s=0.0)


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def engine_with_adaptive(target: Target, inner_size: int = 128, seed: int = 0, collect: int = 0,
                         unroll: int = 3, batch_size: int = 4) -> tuple[SpecEngine, AdaptiveDrafter]:
    head = AdaptiveHead.for_target(target, inner_size=inner_size, seed=seed, lr=3e-3)
    drafter = AdaptiveDrafter(head, collect=collect, unroll=unroll)
    return SpecEngine(target, [drafter], batch_size=batch_size), drafter


def capture_entries(engine: SpecEngine) -> list[StepEntry]:
    """Record every step as wire entries with layer -1 features (what OnlineAdaptive sends).

    The listener goes first (before any that release features); `engine.step_listeners.pop(0)` removes it."""
    engine.record_features = True
    layer = engine.hidden_layers.index(-1)
    out: list[StepEntry] = []

    def listener(records) -> None:
        for r in records:
            out.append(entry_from_record(r, features=r.features[:, layer]))

    engine.step_listeners.insert(0, listener)
    return out


def iter_chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i: i + n]


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc): finds the sidecar a server or benchmark spawned."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().split(")")[-1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out
