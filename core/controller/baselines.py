"""Policies ATLAS is measured against (besides the fixed-k `FixedPolicy`): SGLang 0.5.17's
`--speculative-adaptive`, Arctic Inference's suffix + speculator hybrid, and a hindsight oracle for trace replay. By name: `adaspec.core.controller.registry`.

SGLang re-implementation, followed line by line from the sglang 0.5.17 wheel:
`sglang/srt/speculative/adaptive_spec_params.py` -- `DEFAULT_ADAPTIVE_CONFIG`, `_load_adaptive_config`,
`resolve_candidate_steps_from_config`, `AdaptiveStepSlot.__init__/update/_recompute_params/_apply_target_steps`,
`AdaptiveSpeculativeParams.get_steps_for_batch/on_verify_complete/_route/_pad_to_cuda_graph_bs/
_find_closest_bs`; `sglang/srt/speculative/adaptive_runtime_state.py` -- `AdaptiveController.
activate_step_by_batch/on_verify_complete` (the step used for a batch is its slot's current step; verify
results feed the slot of the verified batch's size); `sglang/srt/arg_groups/speculative_hook.py` --
`_init_adaptive_speculative_params` (initial steps = middle of the union of candidate steps, i.e. 3);
`batch_result_processor.py` (decode batches only, num_correct_drafts = accept_len - 1 = our `accepted`).
With topk = 1 a "step" is one drafted token, so steps = k.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Mapping, Sequence

from adaspec.core.controller.costs import CostModel
from adaspec.core.errors import ConfigError
from adaspec.core.drafters.base import Draft
from adaspec.core.step import Plan, PlanRequest, PolicyBase, StepRecord

# -- SGLang 0.5.17 --speculative-adaptive ------------------------------------------------------------------------

#: `DEFAULT_ADAPTIVE_CONFIG` of sglang 0.5.17, verbatim.
SGLANG_DEFAULT_ADAPTIVE_CONFIG: dict[str, dict] = {
    "1": {"candidate_steps": [1, 3, 7], "up_hysteresis": 0.0, "down_hysteresis": -0.25, "ceiling_coeff": 0},
    "8": {"candidate_steps": [0, 1, 3], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
    "32": {"candidate_steps": [0, 1], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
    "64": {"candidate_steps": [0], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
}


def _bs_entries(cfg: Mapping[str, dict]) -> dict[int, dict]:
    """`_load_adaptive_config`'s validation: integer-string keys with non-empty non-negative int step lists."""
    out: dict[int, dict] = {}
    for key, entry in cfg.items():
        if not key.isdigit():
            continue
        steps = entry.get("candidate_steps")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, int) and s >= 0 for s in steps):
            raise ConfigError(f"BS {key}: candidate_steps must be a list of non-negative ints, got {steps!r}")
        out[int(key)] = entry
    if not out:
        raise ConfigError(f"adaptive config needs at least one integer-string BS key; got {list(cfg)}")
    return out


class SGLangStepSlot:
    """`AdaptiveStepSlot`: EMA of accepted drafts per request; step tier moves with hysteresis."""

    def __init__(self, initial_steps: int, cfg: Mapping) -> None:
        self.candidate_steps = sorted(set(cfg["candidate_steps"]))
        self.ema_alpha = cfg.get("ema_alpha", 0.2)
        self.update_interval = cfg.get("update_interval", 5)
        self.warmup_batches = cfg.get("warmup_batches", 10)
        self.down_hysteresis = cfg.get("down_hysteresis", -0.25)
        self.up_hysteresis = cfg.get("up_hysteresis", 0.0)
        self.ceiling_coeff = cfg.get("ceiling_coeff", 0)
        if initial_steps in self.candidate_steps:
            self.current_steps = initial_steps
        else:
            self.current_steps = self.candidate_steps[len(self.candidate_steps) // 2]
        self.ema_accept_len = float(self.current_steps - 1)  # neutral start
        self._batch_count = 0

    def update(self, num_correct_drafts_per_req: Sequence[int]) -> bool:
        """Feed one verified batch; True when the step tier changed."""
        if not num_correct_drafts_per_req:
            return False
        if self.current_steps > 0:
            avg = sum(num_correct_drafts_per_req) / len(num_correct_drafts_per_req)
            self.ema_accept_len = (1 - self.ema_alpha) * self.ema_accept_len + self.ema_alpha * avg
        self._batch_count += 1
        if self._batch_count <= self.warmup_batches:
            return False
        if (self._batch_count - self.warmup_batches) % self.update_interval != 0:
            return False
        return self._recompute_params()

    def _recompute_params(self) -> bool:
        old_steps = self.current_steps
        idx = self.candidate_steps.index(old_steps)
        old_idx = idx
        if old_steps == 0:  # probe the smallest positive step after a no-spec interval
            idx = min(idx + 1, len(self.candidate_steps) - 1)
            target = self.candidate_steps[idx]
            if target > 0 and self.ema_accept_len < 0:
                self.ema_accept_len = float(target - 1)
            return self._apply(old_steps, target)
        while idx > 0:
            prev = self.candidate_steps[idx - 1]
            drop = (0.5 if prev == 0 else prev - 0.5) + self.down_hysteresis
            if self.ema_accept_len <= drop:
                idx -= 1
            else:
                break
        if not idx < old_idx:
            while idx < len(self.candidate_steps) - 1:
                if self.ema_accept_len > self.candidate_steps[idx] - 0.5 + self.up_hysteresis:
                    idx += 1
                else:
                    break
        target = self.candidate_steps[idx]
        if self.ceiling_coeff > 0:  # only caps downward moves
            ceiling = max(1, math.ceil(self.ema_accept_len * self.ceiling_coeff))
            if ceiling < target <= old_steps:
                while idx > 0 and self.candidate_steps[idx] > ceiling:
                    idx -= 1
                target = self.candidate_steps[idx]
        return self._apply(old_steps, target)

    def _apply(self, old_steps: int, target: int) -> bool:
        if target != old_steps:
            self.current_steps = target
            return True
        return False


class SGLangAdaptiveParams:
    """`AdaptiveSpeculativeParams`: routes a batch size (padded to a CUDA-graph size) to the closest slot below."""

    def __init__(self, initial_steps: int | None = None, config: Mapping[str, dict] | None = None) -> None:
        cfg = dict(config if config is not None else SGLANG_DEFAULT_ADAPTIVE_CONFIG)
        entries = _bs_entries(cfg)
        union = sorted({s for e in entries.values() for s in e["candidate_steps"]})
        if initial_steps is None:  # _init_adaptive_speculative_params
            initial_steps = union[len(union) // 2]
        if initial_steps not in union:
            raise ConfigError(f"initial steps {initial_steps} not in the candidate steps {union}")
        self.initial_steps = initial_steps
        self._bs_list = sorted(entries)
        self.slots = {bs: SGLangStepSlot(initial_steps, {**cfg, **e}) for bs, e in sorted(entries.items())}
        self._cuda_graph_bs: list[int] | None = None

    def set_cuda_graph_bs(self, cuda_graph_bs: Sequence[int] | None) -> None:
        self._cuda_graph_bs = sorted(cuda_graph_bs) if cuda_graph_bs else None

    def get_steps_for_batch(self, batch_size: int) -> int:
        return self.route(batch_size).current_steps

    def on_verify_complete(self, num_correct_drafts_per_req: Sequence[int], batch_size: int) -> int | None:
        slot = self.route(batch_size)
        return slot.current_steps if slot.update(num_correct_drafts_per_req) else None

    def route(self, batch_size: int) -> SGLangStepSlot:
        bs = batch_size
        if self._cuda_graph_bs is not None:
            i = bisect.bisect_left(self._cuda_graph_bs, bs)
            bs = self._cuda_graph_bs[i] if i < len(self._cuda_graph_bs) else bs
        i = bisect.bisect_right(self._bs_list, bs) - 1
        return self.slots[self._bs_list[max(0, i)]]


class SGLangAdaptivePolicy(PolicyBase):
    """SGLang's adaptive lookahead over one drafter: every request of a batch drafts the slot's current k."""

    def __init__(
        self,
        drafter: str = "static",
        initial_steps: int | None = None,
        config: Mapping[str, dict] | None = None,
        cuda_graph_bs: Sequence[int] | None = None,
    ) -> None:
        self.drafter = drafter
        self.params = SGLangAdaptiveParams(initial_steps, config)
        self.params.set_cuda_graph_bs(cuda_graph_bs)
        self._none = Plan(None, 0)

    def plan(self, requests: Sequence[PlanRequest]) -> list[Plan]:
        if any(len(st.pending) > 1 for st in requests):
            return [self._none] * len(requests)  # SGLang drafts after prefill; only decode batches verify
        k = self.params.get_steps_for_batch(len(requests))
        p = Plan(self.drafter, k) if k > 0 else self._none
        return [p] * len(requests)

    def feedback(self, records: Sequence[StepRecord]) -> None:
        decode = [r.accepted for r in records if not r.prefill]
        if decode:
            self.params.on_verify_complete(decode, batch_size=len(decode))


# -- Arctic Inference's suffix + speculator hybrid ---------------------------------------------------------------


def suffix_score(draft: Draft) -> float:
    """A suffix draft's score as SuffixDecoding defines it: the sum of its tokens' cumulative probabilities
    (the expected accepted length under the tree's frequency estimates)."""
    score, prob = 0.0, 1.0
    for p in draft.confidence:
        prob *= p
        score += prob
    return score


class ArcticHybridPolicy(PolicyBase):
    """Snowflake Arctic Inference's hybrid, followed from `arctic_inference/vllm/model_runner.py` (the propose
    path: a request's suffix draft is used when its score >= the model speculator's `n_predict`, otherwise the
    speculator's `n_predict` tokens; the suffix draft may be as long as `suffix_speculative_tokens`, which
    defaults to `suffix_cache_max_depth`) and its docs (docs/suffix-decoding.rst, docs/arctic-speculator.rst).
    The model speculator here is the static head at lookahead k (Arctic's is an MLP/LSTM speculator trained
    offline: the same role). No costs, no learning: a fixed rule per request and step."""

    peek = ("suffix",)

    def __init__(self, model_drafter: str = "static", k: int = 6, suffix_k: int = 32) -> None:
        self.model_drafter, self.k, self.peek_k = model_drafter, k, suffix_k
        self._suffix: dict[str, Draft] = {}

    def peeked(self, drafter: str, requests: Sequence[PlanRequest], drafts: Sequence[Draft]) -> None:
        self._suffix = {r.request_id: d for r, d in zip(requests, drafts)}

    def plan(self, requests: Sequence[PlanRequest]) -> list[Plan]:
        plans = []
        for r in requests:
            d = self._suffix.get(r.request_id)
            if d is not None and d.tokens and suffix_score(d) >= self.k:
                plans.append(Plan("suffix", len(d.tokens)))
            else:
                plans.append(Plan(self.model_drafter, self.k))
        self._suffix = {}  # a prefill step peeks nothing: the speculator drafts
        return plans


# -- hindsight oracle for replay ----------------------------------------------------------------------------------

#: oracle(request, drafter, k) -> how many of the k tokens `drafter` would draft now the target would accept.
AcceptOracle = Callable[[PlanRequest, str, int], int]


class OraclePolicy(PolicyBase):
    """Best (drafter, k) per request in hindsight, priced with the same cost model ATLAS uses.

    The replay harness supplies `oracle`, and `prepare(requests)` if it computes each step's answers in one
    batched pass before `plan` reads them. With `prefix_consistent` (chain drafters: a k-token draft is the
    prefix of the longer one) a single query per drafter at the longest k suffices: accepted(k) = min(A, k).
    The batch goodput E/T is maximised exactly as in ATLAS (Dinkelbach over the separable choices).
    """

    def __init__(
        self,
        drafters: Sequence[str],
        oracle: AcceptOracle,
        costs: CostModel | None = None,
        max_k: int = 8,
        prefix_consistent: bool = True,
        iters: int = 4,
        prepare: Callable[[Sequence[PlanRequest]], None] | None = None,
    ) -> None:
        self.names = [d for d in dict.fromkeys(drafters) if d and d != "none"]
        self.oracle = oracle
        self.prepare = prepare
        self.costs = costs if costs is not None else CostModel()
        self.max_k, self.prefix_consistent, self.iters = max_k, prefix_consistent, iters
        self._none = Plan(None, 0)

    def _accepts(self, st: PlanRequest, kcap: int) -> list[list[int]]:
        """Per drafter: accepted tokens for k = 1..kcap."""
        out = []
        for d in self.names:
            if self.prefix_consistent:
                a = min(kcap, max(0, self.oracle(st, d, kcap)))
                out.append([min(a, k) for k in range(1, kcap + 1)])
            else:
                out.append([min(k, max(0, self.oracle(st, d, k))) for k in range(1, kcap + 1)])
        return out

    def plan(self, requests: Sequence[PlanRequest]) -> list[Plan]:
        B = len(requests)
        if B == 0:
            return []
        if self.prepare is not None:
            self.prepare(requests)  # at a prefill, drafters without state propose nothing
        cm = self.costs
        cost = [cm.b + cm.amortised_draft_cost(d, B) for d in self.names]
        table = []
        pending = 0
        for st in requests:
            room = st.max_new_tokens - len(st.output) - 1
            table.append(self._accepts(st, max(0, min(self.max_k, room))))
            pending += len(st.pending)
        base = cm.a + cm.b * pending + cm.c * B
        lam = B / base
        choice = [(-1, 0)] * B
        for _ in range(self.iters):
            E, T = float(B), base
            for i, acc in enumerate(table):
                best, pick = 0.0, (-1, 0)
                for d, row in enumerate(acc):
                    for k, a in enumerate(row, start=1):
                        g = a - lam * cost[d] * k
                        if g > best:
                            best, pick = g, (d, k)
                choice[i] = pick
                if pick[0] >= 0:
                    E += acc[pick[0]][pick[1] - 1]
                    T += cost[pick[0]] * pick[1]
            new = E / T
            if abs(new - lam) <= 1e-9 * lam:
                break
            lam = new
        return [Plan(self.names[d], k) if d >= 0 else self._none for d, k in choice]

    def feedback(self, records: Sequence[StepRecord]) -> None:
        self.costs.observe(records)
