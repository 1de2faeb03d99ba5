"""`adaspec bench tau`: tau of each drafter at a fixed lookahead per dataset, replayed exactly on traces.

Greedy verification makes a drafter's tau a function of the target's recorded answer only, so each dataset's
traces are recorded once (cached) and every drafter is replayed through the engine's own step loop
(`TraceEngine`), with fresh drafter state per dataset (the suffix drafter starts with an empty cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from adaspec.core.config import Settings
from adaspec.core.datasets import load_prompts
from adaspec.core.drafters.registry import make_drafter
from adaspec.core.drift.replay_engine import TraceEngine
from adaspec.core.drift.traces import TraceStore, trace_layers
from adaspec.core.engine.engine import RequestSpec
from adaspec.core.step import FixedPolicy
from adaspec.core.engine.sampling import SamplingParams


@dataclass
class TauCell:
    dataset: str
    drafter: str
    requests: int
    tokens: int
    forwards: int
    acceptance: float  # accepted / drafted tokens

    @property
    def tau(self) -> float:
        return self.tokens / max(1, self.forwards)


def tau_table(settings: Settings, target: Any, datasets: dict[str, Path], limit: int, drafters: Sequence[str],
              k: int, max_new_tokens: int, batch_size: int, progress: Any = None) -> list[TauCell]:
    layers = trace_layers(settings, target)
    store = TraceStore(settings.cache_dir / "traces", target)
    cells: list[TauCell] = []
    for name, path in datasets.items():
        prompts = [target.encode(r.prompt, chat=settings.chat_template) for r in load_prompts(path, limit)]
        traces = store.ensure(prompts, max_new_tokens, layers, progress=progress)
        for d in drafters:
            engine = TraceEngine(target, {d: make_drafter(d, settings, target)}, lambda *_: 0.0, batch_size)
            specs = [RequestSpec(list(p), f"{name}-{i}") for i, p in enumerate(prompts)]
            engine.traces = {s.request_id: tr for s, tr in zip(specs, traces)}
            res = engine.generate(specs, SamplingParams(max_new_tokens=max_new_tokens), FixedPolicy(d, k))
            recs = [r for g in res for r in g.records]
            drafted = sum(r.drafted for r in recs)
            cells.append(TauCell(name, d, len(res), sum(len(g.output_tokens) for g in res),
                                 sum(g.target_forwards for g in res),
                                 sum(r.accepted for r in recs) / max(1, drafted)))
    return cells
