"""Pre-captured runtime states per batch step count, switched the way `--speculative-adaptive` switches them,
but rarely.

SGLang 0.5.17 binds every shape-dependent resource of a step configuration (draft/target attention backends,
draft/verify/draft-extend CUDA graphs) into a `SpecRuntimeState`, built by
`EAGLEWorkerV2.build_adaptive_runtime_state(steps, steps + 1, cuda_graph_bs)` and swapped in by
`EAGLEWorkerV2.apply_runtime_state(state)` (`srt/speculative/adaptive_runtime_state.py`, `eagle_worker_v2.py`).
`AdaptiveController` keeps them in a dict keyed by steps; ATLAS needs the same registry but its own choice of
steps per batch, so this is that registry without SGLang's EMA -- SGLang-free, duck-typed on the worker.

A switch is not free: `apply_runtime_state` logs an INFO line, rebuilds two device tensors
(`_rebuild_topk1_chain_buffers`) and appends to the runtime context's override log, which is never trimmed
(`runtime_context.py:902`). ATLAS's plans change every step, so `StickySteps` picks the step count with
hysteresis (up at once, down only after a run of batches that needed less) and `compact_overrides` keeps the
override log at one entry per field set.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from adaspec.sglang_ext.chain import batch_steps

#: The `source` SGLang's `apply_runtime_state` records its server-args override under (eagle_worker_v2.py:1418).
RESTORE_SOURCE = "adaptive_spec.restore"


class StickySteps:
    """The step count a batch runs: the smallest candidate covering its longest chain, with hysteresis.

    Up at once (a planned chain is never cut); down only after `downshift_after` consecutive batches that a
    smaller state covers, to the largest of those batches' needs. A batch running more steps than its chains
    need verifies padding (lossless; the target decides every token), which is the price of not switching."""

    def __init__(self, candidates: Sequence[int], downshift_after: int) -> None:
        if not candidates:
            raise ValueError("no candidate step counts")
        self.candidates = sorted(candidates)
        self.downshift_after = int(downshift_after)
        self.active: int | None = None
        self._below = 0  # consecutive batches a smaller state covered
        self._below_need = 0  # the largest need among them

    def choose(self, ks: Sequence[int]) -> int:
        need = batch_steps(ks, self.candidates)
        if self.active is None or need >= self.active or self.downshift_after <= 0:
            self.active, self._below, self._below_need = need, 0, 0
            return need
        self._below += 1
        self._below_need = max(self._below_need, need)
        if self._below >= self.downshift_after:
            self.active, self._below, self._below_need = self._below_need, 0, 0
        return self.active

    def force(self, steps: int) -> None:
        """The state a batch runs regardless of plans (the planning-failure fallback)."""
        self.active, self._below, self._below_need = steps, 0, 0


def compact_overrides(log: list, source: str = RESTORE_SOURCE) -> int:
    """Drop entries of `source` from an override log `[(source, {field: value})]` when a later entry sets all
    of their fields (replaying the log then gives the same config); returns how many were dropped. Keeps the
    log SGLang's runtime-state switches write at a constant length however often the state switches."""
    keep: list = []
    dropped = 0
    later: list[set] = []
    for src, fields in reversed(log):
        names = set(fields)
        if src == source and any(names <= s for s in later):
            dropped += 1
            continue
        keep.append((src, fields))
        later.append(names)
    if dropped:
        log[:] = keep[::-1]
    return dropped


class StepStates:
    """steps -> runtime state; `activate(steps)` applies one before a batch drafts."""

    def __init__(self, worker: Any, candidates: Sequence[int],
                 after_switch: Callable[[int, int], Any] | None = None) -> None:
        """`after_switch(old, new)`: called after each real switch (the worker trims SGLang's override log
        there and counts the switch)."""
        self.worker = worker
        self.candidates = sorted(set(candidates))
        self.states: dict[int, Any] = {}
        self.active: int | None = None
        self.after_switch = after_switch
        self.switches = 0

    def register(self, steps: int, state: Any) -> None:
        """The state the worker already runs (captured at start-up with the server's step count)."""
        self.states[steps] = state
        self.active = steps

    def build_all(self, cuda_graph_bs: list[int] | None) -> None:
        """Capture a state for every candidate not registered yet (at start-up, never while serving)."""
        for steps in self.candidates:
            if steps not in self.states:
                self.states[steps] = self.worker.build_adaptive_runtime_state(
                    speculative_num_steps=steps,
                    speculative_num_draft_tokens=steps + 1,
                    cuda_graph_bs=cuda_graph_bs,
                )

    def activate(self, steps: int) -> None:
        if steps == self.active:
            return
        state = self.states.get(steps)
        if state is None:
            raise ValueError(f"no pre-captured runtime state for steps={steps} (have {sorted(self.states)})")
        old = self.active
        self.worker.apply_runtime_state(state)
        self.active = steps
        self.switches += 1
        if self.after_switch is not None:
            self.after_switch(-1 if old is None else old, steps)
