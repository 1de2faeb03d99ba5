"""Pre-captured runtime states per batch step count, switched the way `--speculative-adaptive` switches them.

SGLang 0.5.17 binds every shape-dependent resource of a step configuration (draft/target attention backends,
draft/verify/draft-extend CUDA graphs) into a `SpecRuntimeState`, built by
`EAGLEWorkerV2.build_adaptive_runtime_state(steps, steps + 1, cuda_graph_bs)` and swapped in by
`EAGLEWorkerV2.apply_runtime_state(state)` (`srt/speculative/adaptive_runtime_state.py`, `eagle_worker_v2.py`).
`AdaptiveController` keeps them in a dict keyed by steps; ATLAS needs the same registry but its own choice of
steps per batch, so this is that registry without SGLang's EMA -- SGLang-free, duck-typed on the worker.
"""

from __future__ import annotations

from typing import Any, Sequence


class StepStates:
    """steps -> runtime state; `activate(steps)` applies one before a batch drafts."""

    def __init__(self, worker: Any, candidates: Sequence[int]) -> None:
        self.worker = worker
        self.candidates = sorted(set(candidates))
        self.states: dict[int, Any] = {}
        self.active: int | None = None

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
        self.worker.apply_runtime_state(state)
        self.active = steps
