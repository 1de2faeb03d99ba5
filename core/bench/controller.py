"""Controller decision time on a synthetic load: `python -m adaspec.core.bench.controller`.

The controller runs in the serving loop once per step for every request, in pure Python, so its cost must stay
far below a target forward: the goal is <= 50 us per request-step (plan + trim + feedback) at batch 64. The
load is synthetic but shaped like real logs: 64 live requests over a few tenants, three drafters with
different acceptance rates, miscalibrated confidences and empty proposals, and a linear step-time model; a
finished request is replaced by a new one. Only the policy's own calls are timed. `SyntheticLoad` is also
the environment the controller tests run against.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from typing import Sequence

from adaspec.core.controller.policy import AtlasPolicy
from adaspec.core.controller.settings import ControllerSettings
from adaspec.core.drafters.base import Draft
from adaspec.core.engine.engine import RequestSpec, RequestState
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.step import PolicyBase, StepRecord
@dataclass(frozen=True)
class DrafterModel:
    """A simulated drafter: per-token acceptance, how its confidence relates to it, what it costs."""

    name: str
    rate: float  # mean per-token conditional acceptance probability
    spread: float = 0.1  # request-to-request standard deviation of that rate
    gamma: float = 1.0  # confidence = p ** gamma (1 = calibrated, >1 under-confident, <1 over-confident)
    empty: float = 0.0  # probability it has nothing to propose for a request this step
    cost_s: float = 1e-4  # seconds per drafted token


DEFAULT_DRAFTERS = (
    DrafterModel("static", rate=0.7, spread=0.1, gamma=1.5, cost_s=1e-5),
    DrafterModel("adaptive", rate=0.8, spread=0.1, gamma=0.7, cost_s=1e-5),
    DrafterModel("suffix", rate=0.6, spread=0.3, gamma=1.0, empty=0.4, cost_s=2e-6),
)


class SyntheticLoad:
    """Requests, drafters and a step-time model; `step(policy)` runs one engine-like step against a policy."""

    def __init__(
        self,
        drafters: Sequence[DrafterModel] = DEFAULT_DRAFTERS,
        batch: int = 64,
        seed: int = 0,
        verify: tuple[float, float, float] = (0.010, 5e-5, 0.0),
        max_new_tokens: int = 256,
        tenants: int = 4,
    ) -> None:
        self.drafters = {d.name: d for d in drafters}
        self.rng = random.Random(seed)
        self.verify = verify
        self.max_new_tokens = max_new_tokens
        self.tenants = tenants
        self.step_no = 0
        self.serial = 0
        self.rates: dict[str, dict[str, float]] = {}
        self.requests = [self._new_request() for _ in range(batch)]
        self.emitted = 0
        self.drafted = 0
        self.sim_time = 0.0
        self.timing = {"plan": 0.0, "trim": 0.0, "feedback": 0.0}
        self.request_steps = 0

    def _new_request(self) -> RequestState:
        rid = f"req-{self.serial}"
        spec = RequestSpec([1, 2, 3], rid, f"tenant-{self.serial % self.tenants}")
        st = RequestState(spec, self.serial, SamplingParams(max_new_tokens=self.max_new_tokens), None)
        st.pending = [3]
        self.serial += 1
        self.rates[rid] = {
            d.name: min(0.99, max(0.0, self.rng.gauss(d.rate, d.spread))) for d in self.drafters.values()
        }
        return st

    def _propose(self, st: RequestState, name: str, k: int) -> tuple[Draft, list[float]]:
        """A draft of up to k tokens plus each token's true acceptance probability."""
        model = self.drafters[name]
        if k <= 0 or self.rng.random() < model.empty:
            return Draft(), []
        rate = self.rates[st.request_id][name]
        ps = [min(1.0, max(0.0, rate + self.rng.gauss(0.0, 0.1))) for _ in range(k)]
        return Draft([0] * k, [p**model.gamma for p in ps]), ps

    def step(self, policy: PolicyBase) -> list[StepRecord]:
        """Plan, draft, trim, verify (simulated), feed back; returns the step's records."""
        self.step_no += 1
        reqs = self.requests
        B = len(reqs)
        t0 = time.perf_counter()
        plans = policy.plan(reqs)
        t1 = time.perf_counter()
        drafts: list[Draft] = []
        truth: list[list[float]] = []
        names: list[str | None] = []
        ks: list[int] = []
        trim_s = 0.0
        for st, p in zip(reqs, plans):
            k = max(0, min(p.k, st.max_new_tokens - len(st.output) - 1)) if p.drafter else 0
            d, ps = self._propose(st, p.drafter, k) if k else (Draft(), [])
            if d.tokens:
                ta = time.perf_counter()
                n = policy.trim(st, p.drafter, d)
                trim_s += time.perf_counter() - ta
                d = d.truncated(n)
            drafts.append(d)
            truth.append(ps)
            names.append(p.drafter if k else None)
            ks.append(p.k)
        draft_s = sum(self.drafters[n].cost_s * len(d.tokens) for n, d in zip(names, drafts) if n)
        drafted = sum(len(d.tokens) for d in drafts)
        self.drafted += drafted
        tokens = B + drafted
        a, b, c = self.verify
        verify_s = a + b * tokens + c * B
        self.sim_time += verify_s + draft_s
        records = []
        for i, st in enumerate(reqs):
            d = drafts[i]
            acc = 0
            for p in truth[i][: len(d.tokens)]:
                if self.rng.random() < p:
                    acc += 1
                else:
                    break
            emitted = min(acc + 1, st.max_new_tokens - len(st.output))
            st.output.extend([0] * emitted)
            self.emitted += emitted
            records.append(
                StepRecord(
                    step=self.step_no, request_id=st.request_id, tenant=st.tenant, drafter=names[i],
                    k=ks[i], drafted=len(d.tokens), accepted=acc, emitted=emitted,
                    confidence=list(d.confidence), batch_size=B, chunk_tokens=1 + len(d.tokens),
                    draft_s=draft_s, verify_s=verify_s, prefill=False,
                )
            )
        t2 = time.perf_counter()
        policy.feedback(records)
        t3 = time.perf_counter()
        self.timing["plan"] += t1 - t0
        self.timing["trim"] += trim_s
        self.timing["feedback"] += t3 - t2
        self.request_steps += B
        for i, st in enumerate(reqs):
            if len(st.output) >= st.max_new_tokens:
                policy.finish(st.request_id)
                self.rates.pop(st.request_id, None)
                reqs[i] = self._new_request()
        return records

    @property
    def goodput(self) -> float:
        """Simulated tokens per second so far."""
        return self.emitted / self.sim_time if self.sim_time else 0.0


def run(batch: int = 64, steps: int = 300, warmup: int = 50, seed: int = 0) -> dict[str, float]:
    """Decision time per request-step (us) of ATLAS on the synthetic load, after a warm-up."""
    load = SyntheticLoad(batch=batch, seed=seed)
    policy = AtlasPolicy([d.name for d in DEFAULT_DRAFTERS], ControllerSettings())
    for _ in range(warmup):
        load.step(policy)
    load.timing = {k: 0.0 for k in load.timing}
    load.request_steps = 0
    load.emitted, load.drafted, load.sim_time = 0, 0, 0.0
    for _ in range(steps):
        load.step(policy)
    n = load.request_steps
    out = {k: v / n * 1e6 for k, v in load.timing.items()}
    out["total"] = sum(out.values())
    out["goodput_tok_s"] = load.goodput
    out["mean_k"] = load.drafted / n
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1, 8, 64)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print("ATLAS controller decision time per request-step (us), synthetic load, 3 drafters")
    print(f"{'batch':>6} {'plan':>8} {'trim':>8} {'feedback':>9} {'total':>8}  {'sim tok/s':>10} {'verified k':>10}")
    for batch in args.batch or [1, 8, 64]:
        steps = args.steps if batch >= 8 else args.steps * 4
        r = run(batch, steps, seed=args.seed)
        print(
            f"{batch:>6} {r['plan']:>8.2f} {r['trim']:>8.2f} {r['feedback']:>9.2f} {r['total']:>8.2f}"
            f"  {r['goodput_tok_s']:>10.0f} {r['mean_k']:>10.2f}"
        )
    print("goal: total <= 50 us per request-step at batch 64")


if __name__ == "__main__":
    main()
