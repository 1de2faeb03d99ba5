"""Measured step costs: what one verify forward and one drafted token cost on this machine, for this model.

Measured once at start-up by running the live engine briefly (plain decoding at two batch sizes and each
drafter at a fixed lookahead), then fitted by least squares: t_verify = a + b * tokens + c * batch, and per
drafter the seconds per drafted token *including* its per-step upkeep (`observe`, e.g. the static head's
draft-extend over the kept tokens, which a drafter pays every step whether or not it is chosen). The result
prices every policy's steps identically (modeled speedup) and seeds the controller's frozen cost model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from adaspec.core import fsio
from adaspec.core.controller.costs import CostModel
from adaspec.core.drafters.base import Drafter, DrafterBase
from adaspec.core.engine.engine import RequestSpec, SpecEngine
from adaspec.core.step import FixedPolicy, StepRecord, forward_tokens
from adaspec.core.engine.sampling import SamplingParams


@dataclass
class StepCosts:
    """t_step = a + b * tokens + c * batch + sum_i drafted_i * draft[drafter_i]
    + sum_d draft_step[d] * (longest chain asked of batched drafter d in the step)   (seconds),
    tokens = what the forward computes (`step.forward_tokens`: padded, or filled up to `multiple`)."""

    a: float
    b: float
    c: float
    draft: dict[str, float] = field(default_factory=dict)
    source: str = "measured"
    #: Batched drafters (one forward per chain position for all rows): seconds per position per step.
    draft_step: dict[str, float] = field(default_factory=dict)
    #: The verify forward runs right-padded chunks (the reference engine where its attention cannot run
    #: packed): a step's tokens are its batch times its widest chunk, so one request's longer chain costs every
    #: row. False: ragged (the reference engine on SDPA, SGLang), tokens summed.
    padded: bool = False
    #: What a forward that verifies any draft costs on top of its tokens (matmul shapes past one row per request).
    spec: float = 0.0
    #: Ragged, a packed forward is filled up to a multiple of this many tokens (`step.forward_tokens`); the
    #: fit's `tokens` are those it computed, fillers included.
    multiple: int = 1

    def verify_time(self, tokens: int, batch: int, spec: bool = False) -> float:
        return self.a + self.b * tokens + self.c * batch + (self.spec if spec else 0.0)

    def draft_cost(self, drafter: str | None) -> float:
        return self.draft.get(drafter, 0.0) if drafter else 0.0

    def record_time(self, rec: StepRecord, width: int | None = None, spec: bool = False) -> float:
        """This request's share of its step without batched draft steps: the fixed costs split evenly, the rest
        its own (`step_shares` adds those); padded, each row costs the step's widest chunk (`width`)."""
        tokens = width if self.padded and width is not None else rec.chunk_tokens
        return ((self.a + (self.spec if spec else 0.0)) / rec.batch_size + self.b * tokens + self.c
                + max(rec.drafted, rec.proposed) * self.draft_cost(rec.drafter))

    def step_shares(self, records: Sequence[StepRecord]) -> list[float]:
        """Each request's share of one step's modeled time: `record_time`, plus the forward's fillers split
        evenly, plus each batched drafter's steps (as deep as the longest chain asked of it) split evenly among
        the requests that used it."""
        width = max((r.chunk_tokens for r in records), default=0)
        spec = any(r.drafted for r in records)
        shares = [self.record_time(r, width, spec) for r in records]
        if not self.padded and records:
            lens = [r.chunk_tokens for r in records]
            fill = self.b * (forward_tokens(lens, False, self.multiple, spec) - sum(lens)) / len(records)
            shares = [t + fill for t in shares]
        if self.draft_step:
            users: dict[str, list[int]] = {}
            for i, r in enumerate(records):
                if r.drafter in self.draft_step and r.k:
                    users.setdefault(r.drafter, []).append(i)
            for d, idx in users.items():
                each = self.draft_step[d] * max(records[i].k for i in idx) / len(idx)
                for i in idx:
                    shares[i] += each
        return shares

    def cost_model(self, frozen: bool = True) -> CostModel:
        """A controller cost model starting from these values: frozen (a replay decides from them alone, so
        it is deterministic) or learning online from the steps it times (a live run on a shared machine)."""
        return CostModel(verify_fixed_s=self.a, verify_token_s=self.b, verify_request_s=self.c,
                         verify_spec_s=self.spec, draft_costs=self.draft, frozen=frozen,
                         draft_step_costs=self.draft_step, padded=self.padded, multiple=self.multiple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "StepCosts":
        return cls(float(d["a"]), float(d["b"]), float(d["c"]), {k: float(v) for k, v in d.get("draft", {}).items()},
                   str(d.get("source", "file")), {k: float(v) for k, v in d.get("draft_step", {}).items()},
                   bool(d.get("padded", False)), float(d.get("spec", 0.0)), int(d.get("multiple", 1)))


class _TimedDrafter(DrafterBase):
    """Wraps a drafter to time its per-step upkeep (`observe`), which the engine's draft_s does not include."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.name = inner.name
        self.hidden_layers = inner.hidden_layers
        self.weight_version = inner.weight_version
        self.chain_forwards = inner.chain_forwards
        self.observe_s = 0.0

    def start(self, request):
        self.inner.start(request)

    def finish(self, request):
        self.inner.finish(request)

    def propose(self, requests, ks):
        return self.inner.propose(requests, ks)

    def observe(self, observations):
        t0 = time.perf_counter()
        self.inner.observe(observations)
        self.observe_s += time.perf_counter() - t0


def _fit_verify(samples: Sequence[tuple[int, int, bool, float]]) -> tuple[float, float, float, float]:
    """Least squares of seconds on (1, tokens, batch, any draft), clipped to non-negative coefficients."""
    X = torch.tensor([[1.0, t, b, float(sp)] for t, b, sp, _ in samples], dtype=torch.float64)
    y = torch.tensor([s for *_, s in samples], dtype=torch.float64)
    if not bool(X[:, 3].any()) or bool(X[:, 3].all()):
        X = X[:, :3]  # no contrast between plain and speculative steps: no speculation term
    coef = torch.linalg.lstsq(X, y.unsqueeze(1)).solution[:, 0].clamp(min=0.0).tolist()
    if coef[1] <= 0.0:  # degenerate design: fall back to a two-parameter fit on tokens
        X2 = X[:, :2]
        coef = torch.linalg.lstsq(X2, y.unsqueeze(1)).solution[:, 0].clamp(min=0.0).tolist() + [0.0]
    coef += [0.0] * (4 - len(coef))
    return coef[0], max(coef[1], 1e-9), coef[2], coef[3]


def _by_step(records: Iterable[StepRecord]) -> list[list[StepRecord]]:
    """Records grouped by the engine step (one forward) they came from, in order."""
    groups: dict[int, list[StepRecord]] = {}
    for r in records:
        groups.setdefault(r.step, []).append(r)
    return list(groups.values())


def _fit_draft(steps: Sequence[tuple[int, int, float]]) -> tuple[float, float] | None:
    """(seconds per chain position per step, seconds per drafted token) of a chain drafter, by least squares
    over its drafting steps (a negative per-token part refits all of it per position); None when the steps
    cannot separate the two (one shape only) or the per-position part comes out zero."""
    if len({(p, t) for p, t, _ in steps}) < 2:
        return None
    X = torch.tensor([[float(p), float(t)] for p, t, _ in steps], dtype=torch.float64)
    y = torch.tensor([s for *_, s in steps], dtype=torch.float64).unsqueeze(1)
    per_pos, per_tok = torch.linalg.lstsq(X, y).solution[:, 0].tolist()
    if per_tok < 0.0:  # all of it per position
        per_pos, per_tok = float((X[:, 0:1].T @ y / (X[:, 0:1].T @ X[:, 0:1])).item()), 0.0
    if per_pos <= 0.0:
        return None
    return per_pos, per_tok


def measure_costs(
    target: Any, drafters: Mapping[str, Drafter], prompts: Sequence[Sequence[int]], new_tokens: int = 24,
    k: int = 6,
) -> StepCosts:
    """Run the live engine briefly and fit `StepCosts` (decode steps only; prefill is priced the same way)."""
    params = SamplingParams(max_new_tokens=new_tokens)
    samples: list[tuple[int, int, bool, float]] = []
    draft: dict[str, float] = {}

    def verify_samples(records: Sequence[StepRecord]) -> None:
        for recs in _by_step(r for r in records if not r.prefill):
            spec = any(r.drafted for r in recs)
            tokens = forward_tokens([r.chunk_tokens for r in recs], padded, multiple, spec)
            samples.append((tokens, recs[0].batch_size, spec, recs[0].verify_s))

    warm = SpecEngine(target, {}, batch_size=2)
    padded, multiple = warm.padded_verify, warm.verify_multiple  # every engine below verifies as this one does
    warm.generate([RequestSpec(list(prompts[0]), "warm")], SamplingParams(max_new_tokens=4), FixedPolicy(None, 0))
    for bs in (1, 4):
        eng = SpecEngine(target, {}, batch_size=bs)
        res = eng.generate([RequestSpec(list(p), f"n{bs}-{i}") for i, p in enumerate(prompts[:bs * 2])],
                           params, FixedPolicy(None, 0))
        verify_samples([r for g in res for r in g.records])
    draft_step: dict[str, float] = {}
    for name, d in drafters.items():
        if name == "none":
            continue
        timed = _TimedDrafter(d)
        # A chain drafter (a head) is also run alone at batch 1: its step cost is per chain position, shared by
        # the rows it drafts for, and a batch-4 run alone cannot tell that from a per-token cost.
        runs = [(4, 2), (4, k)] + ([(1, k)] if d.chain_forwards else [])
        steps: list[tuple[int, int, float]] = []  # (positions, tokens, draft seconds) per drafting step
        observe_s, drafted = 0.0, 0
        for bs, dk in runs:
            eng = SpecEngine(target, {name: timed}, batch_size=bs)
            timed.observe_s = 0.0
            specs = [RequestSpec(list(p), f"{name}-{bs}-{dk}-{i}") for i, p in enumerate(prompts[: max(2, bs)])]
            res = eng.generate(specs, params, FixedPolicy(name, dk))
            recs = [r for g in res for r in g.records]
            verify_samples(recs)
            if dk != k:
                continue
            steps += [(max(r.drafted for r in rs), sum(r.drafted for r in rs), rs[0].draft_s)
                      for rs in _by_step(r for r in recs if r.drafted)]
            observe_s += timed.observe_s
            drafted += sum(r.drafted for r in recs)
        per_token_observe = observe_s / max(1, drafted)
        fit = _fit_draft(steps) if d.chain_forwards else None
        if fit is None:
            draft[name] = (sum(t for *_, t in steps) + observe_s) / max(1, drafted)
        else:
            draft_step[name], draft[name] = fit[0], fit[1] + per_token_observe
    a, b, c, spec = _fit_verify(samples)
    return StepCosts(a, b, c, draft, "measured", draft_step=draft_step, padded=padded, spec=spec,
                     multiple=multiple)


#: Named cost profiles for regimes this machine cannot measure. `gpu-small-model` is an *assumption*, not a
#: measurement: a ~135M target on a modern GPU at small batch is launch/memory-bound (a decode step ~5 ms,
#: each extra verified token ~0.5% of it); the heads are batched -- one EAGLE-3 step over an 8k draft
#: vocabulary ~0.25 ms and one adaptive-MLP step ~0.1 ms per chain position *for the whole batch* (launch-bound
#: at small batch, like SGLang's draft loop); the suffix tree runs per request on the CPU, ~20 us per token. In
#: that regime goodput is nearly proportional to tau.
PROFILES: dict[str, StepCosts] = {
    "gpu-small-model": StepCosts(a=5e-3, b=2.5e-5, c=5e-5, draft={"suffix": 2e-5, "prompt-lookup": 2e-5},
                                 draft_step={"static": 2.5e-4, "adaptive": 1e-4},
                                 source="profile:gpu-small-model (assumed)"),
    #: An 8B-70B-class target on a GPU at small batch (a decode step ~25 ms, an extra verified token ~0.2% of
    #: it) with the same small drafters: drafting is nearly free next to the target, so goodput ~ tau -- the
    #: regime adaptive speculation is built for (also an assumption, not a measurement).
    "gpu-large-target": StepCosts(a=2.5e-2, b=5e-5, c=1e-4, draft={"suffix": 2e-5, "prompt-lookup": 2e-5},
                                  draft_step={"static": 4e-4, "adaptive": 2e-4},
                                  source="profile:gpu-large-target (assumed)"),
}


def resolve_costs(spec: str | None) -> StepCosts | None:
    """`None`/"measured" -> None (measure here); a profile name or a JSON file -> those costs."""
    if spec is None or spec == "measured":
        return None
    if spec in PROFILES:
        return PROFILES[spec]
    path = Path(spec)
    if not path.is_file():
        from adaspec.core.errors import RequestError

        raise RequestError(f"--costs {spec!r}: not 'measured', a profile ({', '.join(PROFILES)}) or a JSON file")
    return StepCosts.from_json(json.loads(path.read_text()))


def load_or_measure(
    path: Path, target: Any, drafters: Mapping[str, Drafter], prompts: Sequence[Sequence[int]], remeasure: bool
) -> StepCosts:
    """Costs cached per machine setup in `path` (JSON); measured when missing, or when asked to."""
    if path.is_file() and not remeasure:
        costs = StepCosts.from_json(json.loads(path.read_text()))
        probe = SpecEngine(target, {})  # a cache from another verify mode is stale
        same_mode = (costs.padded, costs.multiple) == (probe.padded_verify, probe.verify_multiple)
        if same_mode and all(n in costs.draft or n in costs.draft_step for n in drafters if n != "none"):
            return costs
    costs = measure_costs(target, drafters, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.write_json(path, costs.to_json())
    return costs
