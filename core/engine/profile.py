"""Where a live engine's time goes, stage by stage: the numbers behind "ATLAS costs what a plain step costs".

The engine adds the wall seconds of every stage of every step here (a few `perf_counter` calls per stage:
always on, well under 1 us per step). Decode steps are split into stages; a prefill step counts as one stage
of its own (its forward is the prompt, not comparable with a decode step). `adaspec bench drift --live
--profile` prints one column per policy, so every overhead ATLAS adds over plain decoding is a number.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

#: Stages in the order a decode step runs them (names with a ':' suffix are per drafter or per hook).
STAGE_ORDER = ("between_steps", "retire", "peek", "plan", "draft", "trim", "forward", "accept", "commit",
               "observe", "feedback", "listeners", "kv_compact", "prefill")


def stage_rank(stage: str) -> int:
    """Where a stage (`name` or `name:detail`) runs in a decode step: its index in STAGE_ORDER (unknown: last)."""
    base = stage.split(":")[0]
    return STAGE_ORDER.index(base) if base in STAGE_ORDER else len(STAGE_ORDER)


class StepProfile:
    """Accumulated wall seconds per stage over an engine's steps (decode steps counted in `steps`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps = 0  # decode steps
        self.prefills = 0
        self.wall_s = 0.0  # decode steps' wall time, start of between_steps to the end of the step
        self.fed_tokens = 0  # tokens the decode steps' forwards verified (pending + drafts over the batch)
        self.rows = 0  # requests over the decode steps

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def section(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def reset(self) -> None:
        self.__init__()

    def snapshot(self) -> tuple[dict[str, float], int, int, float, int, int]:
        return dict(self.seconds), self.steps, self.prefills, self.wall_s, self.fed_tokens, self.rows

    def add_since(self, other: "StepProfile", snap: tuple[dict[str, float], int, int, float, int, int]) -> None:
        """Add what `other` accumulated since `snap` (its `snapshot()`): a share of its steps, e.g. one phase's."""
        seconds, steps, prefills, wall_s, fed, rows = snap
        for stage, s in other.seconds.items():
            d = s - seconds.get(stage, 0.0)
            if d:
                self.add(stage, d)
        self.steps += other.steps - steps
        self.prefills += other.prefills - prefills
        self.wall_s += other.wall_s - wall_s
        self.fed_tokens += other.fed_tokens - fed
        self.rows += other.rows - rows

    def ms_per_step(self) -> dict[str, float]:
        """Milliseconds per decode step for each stage, in step order (prefill: per decode step too, so the
        column sums to the average step's share of the run)."""
        n = max(1, self.steps)
        return {s: self.seconds[s] / n * 1e3 for s in sorted(self.seconds, key=lambda s: (stage_rank(s), s))}

    def to_json(self) -> dict[str, object]:
        n = max(1, self.steps)
        return {"steps": self.steps, "prefills": self.prefills, "wall_ms_per_step": self.wall_s / n * 1e3,
                "fed_tokens_per_step": self.fed_tokens / n, "batch_per_step": self.rows / n,
                "ms_per_step": self.ms_per_step()}
