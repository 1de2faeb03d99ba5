"""The ATLAS controller: calibration, cost model, planning, guardrail, exploration, baselines (no real model)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspec.core.bench.controller import DrafterModel, SyntheticLoad
from adaspec.core.controller import (
    AtlasPolicy,
    Calibrator,
    ControllerSettings,
    CostModel,
    OraclePolicy,
    SGLangAdaptivePolicy,
    load_controller_settings,
    make_policy,
    pav,
    policy_drafters,
)
from adaspec.core.drafters.base import Draft, DrafterBase
from adaspec.core.engine.engine import RequestSpec, RequestState
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.step import FixedPolicy, Plan, StepRecord
from adaspec.core.errors import ConfigError


def state(rid: str, tenant: str = "t", max_new: int = 10_000, pending: int = 1) -> RequestState:
    st_ = RequestState(RequestSpec([1, 2, 3], rid, tenant), 0, SamplingParams(max_new_tokens=max_new), None)
    st_.pending = [3] * pending
    return st_


def record(step: int, rid: str, drafter: str | None, k: int, accepted: int, conf: list[float], batch: int = 1,
           verify_s: float = 0.01, draft_s: float = 0.0, prefill: bool = False, tenant: str = "t") -> StepRecord:
    return StepRecord(
        step=step, request_id=rid, tenant=tenant, drafter=drafter, k=k, drafted=len(conf), accepted=accepted,
        emitted=accepted + 1, confidence=conf, batch_size=batch, chunk_tokens=1 + len(conf), draft_s=draft_s,
        verify_s=verify_s, prefill=prefill,
    )


def run(load: SyntheticLoad, policy, steps: int) -> list[StepRecord]:
    out: list[StepRecord] = []
    for _ in range(steps):
        out += load.step(policy)
    return out


# -- calibration ---------------------------------------------------------------------------------------------------


def test_pav_pools_violators():
    assert pav([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert pav([0.1, 0.5, 0.3, 0.9], [1.0, 1.0, 3.0, 1.0]) == pytest.approx([0.1, 0.35, 0.35, 0.9])
    assert pav([0.2, 0.4], [1.0, 1.0]) == [0.2, 0.4]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8), st.integers(0, 8)),
                min_size=1, max_size=60))
def test_calibration_is_monotone_in_confidence(drafts):
    cal = Calibrator(bins=8, positions=4, refit_tokens=1)
    for conf, acc in drafts:
        cal.update(conf, min(acc, len(conf)))
    cal.refit()
    for p in range(4):
        curve = cal.curve(p)
        assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))
        assert all(0.0 <= x <= 1.0 for x in curve)


def test_calibration_converges_to_true_rates():
    truth = lambda c: 0.1 + 0.8 * c * c  # noqa: E731  monotone, far from the identity prior
    rng = random.Random(0)
    cal = Calibrator(bins=10, positions=4, half_life_tokens=0)
    for _ in range(6000):
        conf = [rng.random() for _ in range(6)]
        acc = 0
        for c in conf:
            if rng.random() < truth(c):
                acc += 1
            else:
                break
        cal.update(conf, acc)
    checked = 0
    for p in range(4):
        curve, ev = cal.curve(p), cal.evidence_table()[p]
        for b in range(10):
            if ev[b] >= 150:
                lo, hi = b / 10, (b + 1) / 10
                mean_truth = 0.1 + 0.8 * (hi**3 - lo**3) / (3 * (hi - lo))
                assert curve[b] == pytest.approx(mean_truth, abs=0.05), (p, b)
                checked += 1
    assert checked >= 18
    # A chain's survival curve is the product of its calibrated per-token probabilities.
    c = cal.cumulative([0.95, 0.95])
    assert c[1] == pytest.approx(cal.prob(0.95, 0) * cal.prob(0.95, 1))


def test_calibration_respects_prior_with_little_data():
    cal = Calibrator(bins=10, positions=2, prior_strength=4.0, refit_tokens=1)
    assert cal.prob(0.95, 0) == pytest.approx(0.95)  # identity before any data
    for _ in range(3):
        cal.update([0.95], 0)  # three rejections at high confidence
    assert cal.cell_evidence(0.95, 0) == pytest.approx(3.0, rel=1e-3)  # (decays with the half-life)
    assert 0.5 < cal.prob(0.95, 0) < 0.6  # (0 + 4 * 0.95) / 7 = 0.543: still near the prior
    for _ in range(500):
        cal.update([0.95], 0)
    assert cal.prob(0.95, 0) < 0.05


def test_tokens_after_the_first_rejection_are_not_evidence():
    cal = Calibrator(bins=10, positions=4, refit_tokens=1)
    cal.update([0.9, 0.9, 0.9, 0.9], accepted=1)  # token 0 accepted, token 1 rejected, 2-3 never judged
    assert [cal.cell_evidence(0.9, p) for p in range(4)] == pytest.approx([1.0, 1.0, 0.0, 0.0], abs=1e-3)
    assert cal.evidence == pytest.approx(2.0, rel=1e-3)
    # pooled bin 9: (1 + 4 * 0.95) / 6 = 0.8 < bin 8's prior 0.85 -> PAV pools them: (4 * 0.85 + 6 * 0.8) / 10
    assert cal.prob(0.9, 2) == pytest.approx(0.82)  # unseen position: the pooled curve
    assert cal.prob(0.9, 0) == pytest.approx((1 + 4 * 0.82) / 5)  # one success, shrunk toward 0.82
    assert cal.prob(0.9, 0) > cal.prob(0.9, 2) > cal.prob(0.9, 1)
    cal.update([0.9, 0.9], accepted=2)  # fully accepted chain: every token judged
    assert cal.evidence == pytest.approx(4.0, rel=1e-3)


def test_calibration_forgets_with_its_half_life():
    cal = Calibrator(bins=4, positions=1, half_life_tokens=100)
    for _ in range(100):
        cal.update([0.9], 1)
    first = cal.evidence
    for _ in range(100):
        cal.update([0.1], 1)
    assert cal.cell_evidence(0.9, 0) == pytest.approx(first / 2, rel=1e-6)


# -- cost model -----------------------------------------------------------------------------------------------------


def test_cost_model_recovers_known_coefficients():
    a, b, c = 0.02, 3e-4, 1e-3
    rng = random.Random(1)
    cm = CostModel(verify_fixed_s=0.005, verify_token_s=1e-5, verify_request_s=0.0)
    for step in range(600):
        B = rng.randint(1, 64)
        ks = [rng.randint(0, 8) for _ in range(B)]
        tokens = B + sum(ks)
        t = (a + b * tokens + c * B) * (1 + rng.gauss(0, 0.01))
        cm.observe([record(step, f"r{i}", "s" if k else None, k, 0, [0.5] * k, batch=B, verify_s=t,
                           draft_s=2e-4 * sum(ks)) for i, k in enumerate(ks)])
    fa, fb, fc = cm.coefficients
    assert fa == pytest.approx(a, rel=0.1) and fb == pytest.approx(b, rel=0.1) and fc == pytest.approx(c, rel=0.15)
    assert cm.draft_cost("s") == pytest.approx(2e-4, rel=0.02)
    assert cm.draft_cost(None) == 0.0
    t = cm.expected_step_time([3, 0], ["s", None])
    assert t == pytest.approx(fa + fb * 5 + fc * 2 + 3 * cm.draft_cost("s"))


def test_draft_time_is_split_across_drafters():
    cm = CostModel(draft_token_s=1e-4, draft_alpha=0.2)
    rng = random.Random(2)
    for _ in range(400):
        n1, n2 = rng.randint(1, 20), rng.randint(1, 20)
        cm.observe_draft({"slow": n1, "fast": n2}, n1 * 1e-4 + n2 * 1e-5)
    assert cm.draft_cost("slow") == pytest.approx(1e-4, rel=0.15)
    assert cm.draft_cost("fast") == pytest.approx(1e-5, rel=0.3)


# -- ATLAS ----------------------------------------------------------------------------------------------------------

GOOD_BAD = (DrafterModel("good", rate=0.9, spread=0.03, cost_s=1e-5),
            DrafterModel("bad", rate=0.3, spread=0.05, cost_s=1e-5))


def test_converges_to_the_better_drafter_with_long_chains():
    load = SyntheticLoad(GOOD_BAD, batch=8, seed=3)
    policy = AtlasPolicy(["good", "bad"], ControllerSettings(guarded=()))
    run(load, policy, 150)
    recs = run(load, policy, 100)
    used = Counter(r.drafter for r in recs)
    assert used["good"] >= 0.85 * len(recs)
    ks = [r.k for r in recs if r.drafter == "good"]
    assert sum(ks) / len(ks) >= 5.0
    # over the whole run (learning included) ATLAS beats mid-k fixed policies and nearly matches the best one
    base = {}
    for name, pol in {"good-4": FixedPolicy("good", 4), "good-8": FixedPolicy("good", 8),
                      "bad-4": FixedPolicy("bad", 4)}.items():
        ref = SyntheticLoad(GOOD_BAD, batch=8, seed=3)
        run(ref, pol, 250)
        base[name] = ref.goodput
    assert load.goodput > max(base["good-4"], base["bad-4"])
    assert load.goodput >= 0.9 * base["good-8"]


def test_no_speculation_when_acceptance_is_near_zero():
    useless = (DrafterModel("a", rate=0.01, spread=0.0, cost_s=1e-5), DrafterModel("b", rate=0.02, spread=0.0))
    load = SyntheticLoad(useless, batch=4, seed=4, verify=(0.02, 1e-3, 0.0))
    policy = AtlasPolicy(["a", "b"], ControllerSettings(explore_every=0, verify_fixed_s=0.02, verify_token_s=1e-3))
    run(load, policy, 60)
    recs = run(load, policy, 40)
    assert sum(r.k for r in recs) == 0


def test_speculation_turns_off_when_verify_is_compute_bound():
    s = ControllerSettings(explore_every=0, guarded=(), verify_fixed_s=1e-3, verify_token_s=1e-3, trim=False,
                           prior_acceptance=0.8)
    good = (DrafterModel("good", rate=0.9, spread=0.02, cost_s=0.0),)
    small = SyntheticLoad(good, batch=1, seed=5, verify=(1e-3, 1e-3, 0.0))
    policy = AtlasPolicy(["good"], s)
    recs = run(small, policy, 80)
    assert recs[-1].k >= 4  # at batch 1 the fixed cost dominates: long chains pay
    big = [state(f"big-{i}") for i in range(64)]
    assert all(p == Plan(None, 0) for p in policy.plan(big))  # at 64 every extra token costs ~ a forward
    assert any(p.k for p in policy.plan(big[:1]))
    capped = AtlasPolicy(["good"], s.model_copy(update={"max_spec_batch": 8}))
    assert all(p.k == 0 for p in capped.plan(big[:8])) and any(p.k for p in capped.plan(big[:2]))


STATIC_ADAPTIVE = (DrafterModel("static", rate=0.6, spread=0.03, cost_s=1e-5),
                   DrafterModel("adaptive", rate=0.9, spread=0.03, cost_s=1e-5))


def test_guardrail_needs_evidence_before_trusting_adaptive():
    load = SyntheticLoad(STATIC_ADAPTIVE, batch=8, seed=6)
    policy = AtlasPolicy(["static", "adaptive"], ControllerSettings(explore_every=0, guard_min_evidence=50))
    recs = run(load, policy, 40)
    assert policy.trusted == [True, False]
    assert not any(r.drafter == "adaptive" for r in recs)
    assert sum(r.drafter == "static" for r in recs) >= 0.9 * len(recs)


def test_guardrail_trusts_then_falls_back_on_a_drop():
    load = SyntheticLoad(STATIC_ADAPTIVE, batch=8, seed=7)
    policy = AtlasPolicy(["static", "adaptive"], ControllerSettings(explore_every=4, guard_min_evidence=50))
    run(load, policy, 150)
    assert policy.trusted == [True, True]
    recs = run(load, policy, 30)
    assert sum(r.drafter == "adaptive" for r in recs) >= 0.8 * len(recs)
    # the adaptive head degrades (a bad weight update): acceptance falls below static's
    load.drafters["adaptive"] = dataclasses.replace(load.drafters["adaptive"], rate=0.05)
    for rates in load.rates.values():
        rates["adaptive"] = 0.05
    run(load, policy, 60)
    assert policy.trusted == [True, False]
    recs = run(load, policy, 30)
    explored = sum(r.drafter == "adaptive" for r in recs)
    assert explored <= 4 * 30 // 4  # only exploration drafts still go to adaptive
    assert sum(r.drafter == "static" for r in recs) >= 0.75 * len(recs)


def test_without_static_an_untrusted_adaptive_leaves_the_others():
    models = (DrafterModel("adaptive", rate=0.9, spread=0.0), DrafterModel("suffix", rate=0.5, spread=0.0))
    load = SyntheticLoad(models, batch=4, seed=8)
    policy = AtlasPolicy(["adaptive", "suffix"], ControllerSettings(explore_every=0, guard_min_evidence=1e9))
    recs = run(load, policy, 30)
    assert {r.drafter for r in recs} <= {"suffix", None} and any(r.drafter == "suffix" for r in recs)


def test_exploration_revisits_unused_drafters_on_schedule():
    models = (DrafterModel("good", rate=0.9, spread=0.0), DrafterModel("bad", rate=0.0, spread=0.0))
    load = SyntheticLoad(models, batch=4, seed=9)
    policy = AtlasPolicy(["good", "bad"], ControllerSettings(guarded=(), explore_every=10, explore_k=2))
    recs = run(load, policy, 100)
    bad_steps = sorted({r.step for r in recs if r.drafter == "bad"})
    late = [s for s in bad_steps if s > 30]
    assert late and all(b - a >= 10 for a, b in zip(late, late[1:]))
    assert all(r.k == 2 for r in recs if r.drafter == "bad" and r.step > 30)


def test_exploration_backs_off_a_drafter_that_keeps_finding_nothing_and_resets_when_it_is_chosen():
    """Probes of a drafter the planner never chooses come half as often each time, down to once per 8 x
    explore_every steps; once it is chosen again (it got good) it is probed at the base period; a new weight
    version resets the period too."""
    models = (DrafterModel("good", rate=0.9, spread=0.0), DrafterModel("bad", rate=0.0, spread=0.0))
    load = SyntheticLoad(models, batch=4, seed=9)
    policy = AtlasPolicy(["good", "bad"], ControllerSettings(guarded=(), explore_every=10, explore_k=2))
    recs = run(load, policy, 1200)
    probes = sorted({r.step for r in recs if r.drafter == "bad"})
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    late = gaps[-6:]
    assert 20 in gaps and 40 in gaps and all(a <= b for a, b in zip(gaps, gaps[1:])), gaps
    assert max(gaps) == 80 and late == [80] * 6  # capped at 8 x explore_every
    d = policy.index["bad"]
    policy._chosen[d] = True  # the planner chose it since its last probe
    policy.last_used[d] = policy.step - 80
    policy.plan([state("x")])
    assert policy.explore_period[d] == 10
    policy.explore_period[d] = 80
    policy.feedback([record(policy.step, "x", "bad", 2, 0, [0.1, 0.1])])
    assert policy.explore_period[d] == 80  # the same weights: no reset
    rec = record(policy.step, "x", "bad", 2, 0, [0.1, 0.1])
    rec.weight_version = 3
    policy.feedback([rec])
    assert policy.explore_period[d] == 10


def test_padded_widths_are_priced_as_measured_not_as_the_linear_fit_says():
    """On this CPU a batch-4 chunk of 2..7 tokens per row costs about the same forward; the linear fit prices
    each extra width at b * batch. Online, the cost model keeps what each (batch, width) measured and the
    planner reads that: once a wide step is seen to cost what a narrow one does, a long chain that would not
    pay at the linear price is planned. Unmeasured widths are priced as the widest measured narrower one (they
    get tried); frozen (replay) models keep the linear price."""
    def steps(cm, width, seconds, n=3):
        for i in range(n):
            recs = [StepRecord(step=cm.steps_seen + 1, request_id=f"r{j}", tenant="t", drafter="d" if width > 1
                               else None, k=width - 1, drafted=width - 1, accepted=0, emitted=1,
                               confidence=[0.5] * (width - 1), batch_size=4, chunk_tokens=width, draft_s=0.0,
                               verify_s=seconds, prefill=False) for j in range(4)]
            cm.observe(recs)

    cm = CostModel(verify_fixed_s=0.03, verify_token_s=0.006, verify_request_s=0.001, verify_spec_s=0.02,
                   draft_token_s=0.0, padded=True, prior_weight=1e6)  # a stiff linear fit: b stays ~6 ms
    linear = cm.width_extra(4, 6)
    assert linear == pytest.approx(cm.b * 4 * 6 + cm.s)
    steps(cm, 1, 0.065)
    steps(cm, 3, 0.100)
    assert cm.width_extra(4, 2) == pytest.approx(0.035, rel=1e-6)
    assert cm.width_extra(4, 6) == pytest.approx(min(linear, 0.035), rel=1e-6)  # not measured: as width 2
    steps(cm, 7, 0.098)
    assert cm.width_extra(4, 6) == pytest.approx(0.033, rel=1e-6) and 0.033 < linear
    frozen = CostModel(verify_fixed_s=0.03, verify_token_s=0.006, padded=True, frozen=True)
    steps(frozen, 1, 0.065)
    steps(frozen, 7, 0.098)
    assert frozen.width_extra(4, 6) == pytest.approx(frozen.b * 24 + frozen.s)

    def planned(costs):
        pol = AtlasPolicy(["d"], ControllerSettings(guarded=(), explore_every=0), costs=costs)
        pol.set_padded_verify(True)
        states = [state(f"r{i}") for i in range(4)]
        pol.plan(states)
        for i in range(4):
            r = pol.requests[f"r{i}"]
            r.cum[0], r.seen[0] = [0.7 ** (j + 1) for j in range(6)], pol.step + 1
        return [p.k for p in pol.plan(states)]

    stiff = dict(verify_fixed_s=0.03, verify_token_s=0.006, verify_request_s=0.001, verify_spec_s=0.02,
                 draft_token_s=0.0, padded=True, prior_weight=1e6)
    fresh = CostModel(**stiff)
    assert max(planned(fresh)) < 6  # at the linear price the long tail does not pay
    assert max(planned(cm)) == 6  # measured flat in width: the whole chain does


def test_exploration_skips_a_drafter_that_could_not_pay_even_if_always_right():
    """On a compute-bound verify (this CPU) a drafter whose own cost plus a verified token's exceeds what a token
    is worth is never explored: no evidence could make the planner pick it, and each probe costs the batch."""
    costs = CostModel(verify_fixed_s=0.01, verify_token_s=0.005, draft_token_s=0.0, frozen=True,
                      draft_costs={"cheap": 1e-5, "dear": 0.5})
    pol = AtlasPolicy(["cheap", "dear"], ControllerSettings(guarded=(), explore_every=4, explore_k=2), costs=costs)
    states = [state(f"r{i}") for i in range(4)]
    used: dict[str, int] = {}
    for _ in range(40):
        for p in pol.plan(states):
            if p.drafter:
                used[p.drafter] = used.get(p.drafter, 0) + 1
    assert used.get("cheap", 0) > 0 and "dear" not in used
    free = AtlasPolicy(["cheap", "dear"], ControllerSettings(guarded=(), explore_every=4, explore_k=2),
                       costs=CostModel(verify_fixed_s=0.01, verify_token_s=0.005, draft_token_s=0.0, frozen=True,
                                       draft_costs={"cheap": 1e-5, "dear": 1e-5}))
    seen = {p.drafter for _ in range(40) for p in free.plan(states)}
    assert "dear" in seen  # the control: at the same price as the other it is explored


def _emitting(step: int, rid: str, emitted: list[int], drafter: str | None = None, conf: list[float] = ()) -> StepRecord:
    rec = record(step, rid, drafter, len(conf), len(emitted) - 1, list(conf))
    rec.emitted_tokens = list(emitted)
    return rec


def test_peeked_drafts_the_plan_did_not_serve_are_scored_against_what_the_request_emits():
    """A peeked suffix draft the step does not serve is matched against the tokens the request emits over the
    next steps: its calibrator gets (confidences, matched prefix) once a token differs or all match -- so a
    drafter that is never planned still gains evidence. A served peeked draft is counted once (by its own
    feedback), and nothing is scored before the outcome is known."""
    costs = CostModel(verify_fixed_s=0.01, verify_token_s=0.05, draft_token_s=0.0, frozen=True,
                      draft_costs={"suffix": 1e-5})
    pol = AtlasPolicy(["suffix"], ControllerSettings(guarded=(), explore_every=0), costs=costs)
    cal = pol.calibrators[0]
    st = [state("a")]
    pol.peeked("suffix", st, [Draft([7, 8, 9], [0.9, 0.8, 0.7])])
    assert [p.drafter for p in pol.plan(st)] == [None]  # verify too dear: not served
    pol.feedback([_emitting(pol.step, "a", [7])])
    assert cal.evidence == 0.0  # one of three tokens known, all matching so far
    pol.plan(st)
    pol.feedback([_emitting(pol.step, "a", [8])])
    assert cal.evidence == 0.0
    pol.plan(st)
    pol.feedback([_emitting(pol.step, "a", [5])])  # the third token differs: 2 accepted, 1 rejection
    assert cal.evidence == pytest.approx(3.0, rel=1e-3)
    before = [cal.prob(0.9, 0), cal.prob(0.7, 2)]
    # a whole matching draft in one step
    pol.peeked("suffix", st, [Draft([1, 2], [0.9, 0.8])])
    pol.plan(st)
    pol.feedback([_emitting(pol.step, "a", [1, 2, 4])])
    assert cal.evidence == pytest.approx(5.0, rel=1e-3)  # (evidence decays with its half-life)
    assert cal.prob(0.9, 0) >= before[0]
    # served as peeked: the record's own feedback counts it, the shadow does not count it again
    cheap = AtlasPolicy(["suffix"], ControllerSettings(guarded=(), explore_every=0),
                        costs=CostModel(verify_fixed_s=0.01, verify_token_s=1e-6, draft_token_s=0.0, frozen=True,
                                        draft_costs={"suffix": 1e-6}))
    for _ in range(80):  # enough evidence that the peek is used, with high acceptance
        cheap.peeked("suffix", st, [Draft([1, 2], [0.9, 0.9])])
        plan = cheap.plan(st)[0]
        if plan.drafter:
            cheap.feedback([_emitting(cheap.step, "a", [1, 2, 3][: plan.k + 1], "suffix", [0.9, 0.9][: plan.k])])
        else:
            cheap.feedback([_emitting(cheap.step, "a", [1, 2, 3])])
    ev = cheap.calibrators[0].evidence
    cheap.peeked("suffix", st, [Draft([1, 2], [0.9, 0.9])])
    plan = cheap.plan(st)[0]
    assert plan.drafter == "suffix" and plan.k == 2
    cheap.feedback([_emitting(cheap.step, "a", [1, 2, 3], "suffix", [0.9, 0.9])])
    assert cheap.calibrators[0].evidence == pytest.approx(ev + 2.0, rel=1e-3)


def test_padded_exploration_rides_along_a_planned_width_and_is_a_shadow_on_a_plain_step():
    """With padded verify a probe's width is paid by the whole batch: when a row's chain pays, every row that
    drafts nothing rides along within its width (rows with a plan keep it). When nothing is planned, a verified
    probe would make a plain forward speculative: one row drafts, `trim` keeps the draft out of the forward
    (0 tokens verified) and scores it against what the request emits next, which teaches b's calibration and
    curves as a served draft's outcome would -- and the step's own record teaches nothing."""
    costs = CostModel(verify_fixed_s=0.01, verify_token_s=0.005, draft_token_s=0.0, frozen=True)  # nothing pays

    def explore_rows(padded: bool) -> tuple[AtlasPolicy, list, list]:
        pol = AtlasPolicy(["a", "b"], ControllerSettings(guarded=(), explore_every=5, explore_k=2), costs=costs)
        pol.set_padded_verify(padded)
        states = [state(f"r{i}") for i in range(4)]
        pol.plan(states)
        pol.last_used = [pol.step + 1, -100]  # only b is due for exploration
        return pol, states, pol.plan(states)

    for padded in (True, False):
        pol, states, plans = explore_rows(padded)
        probed = [i for i, p in enumerate(plans) if p.drafter == "b"]
        assert len(probed) == 1 and plans[probed[0]].k == 2, padded
    i = probed[0]
    rid = states[i].request_id
    n0, ev0 = pol.glob_n[1], pol.calibrators[1].evidence
    assert pol.trim(states[i], "b", Draft([7, 8], [0.9, 0.8])) == 0  # drafted, not verified
    pol.feedback([_emitting(pol.step, rid, [7], "b", [])])  # the plain step: b's record verified nothing
    assert pol.glob_n[1] == n0 and pol.calibrators[1].evidence == ev0  # nothing learned from an empty record
    pol.plan(states)
    pol.feedback([_emitting(pol.step, rid, [5])])  # the second token differs: 1 of 2 matched
    assert pol.glob_n[1] == n0 + 1 and pol.calibrators[1].evidence == pytest.approx(ev0 + 2.0, rel=1e-3)
    assert pol.curve("b", rid)[0] > pol.curve("b", rid)[1]  # the first token survived, the second did not
    # r0 has a chain that pays: it keeps it, the others ride along within its width
    pol = AtlasPolicy(["a", "b"], ControllerSettings(guarded=(), explore_every=5, explore_k=2),
                      costs=CostModel(verify_fixed_s=0.05, verify_token_s=0.001, draft_token_s=0.0, frozen=True))
    pol.set_padded_verify(True)
    states = [state(f"r{i}") for i in range(4)]
    pol.plan(states)
    r0 = pol.requests["r0"]
    r0.cum[0], r0.seen[0] = [0.99] * 6, pol.step + 1
    for i in range(1, 4):
        r = pol.requests[f"r{i}"]
        r.cum[0], r.seen[0] = [0.01] * 6, pol.step + 1
    pol.last_used = [pol.step + 1, -100]
    plans = pol.plan(states)
    assert plans[0].drafter == "a" and plans[0].k >= 2
    assert [p.drafter for p in plans[1:]] == ["b"] * 3 and all(p.k <= plans[0].k for p in plans[1:])


def test_trim_cuts_where_calibrated_acceptance_collapses():
    policy = AtlasPolicy(["d"], ControllerSettings(guarded=(), explore_every=0, calib_refit_tokens=1))
    cal = policy.calibrators[0]
    for _ in range(200):
        cal.update([0.9, 0.05], 1)  # high confidence accepted, low confidence rejected
    st_ = state("r0")
    policy.plan([st_])
    draft = Draft([5, 6, 7, 8], [0.9, 0.9, 0.05, 0.9])
    assert policy.trim(st_, "d", draft) == 2
    assert policy.trim(st_, "d", Draft([5, 6], [0.9, 0.9])) == 2
    assert policy.trim(st_, "unknown", draft) == 4
    off = AtlasPolicy(["d"], ControllerSettings(guarded=(), explore_every=0, calib_refit_tokens=1, trim=False))
    off.calibrators[0] = cal  # the same evidence that cut the draft above
    off.plan([st_])
    assert off.trim(st_, "d", draft) == 4  # trim switched off: every proposed token is verified


def test_request_curves_warm_start_from_tenant_then_global():
    policy = AtlasPolicy(["d"], ControllerSettings(guarded=(), explore_every=0))
    prior = policy.curve("d")
    a = state("a", tenant="T1")
    policy.plan([a])
    policy.feedback([record(1, "a", "d", 4, 4, [0.99] * 4, tenant="T1")])
    t1 = policy.curve("d", tenant="T1")
    assert t1[0] > prior[0]
    b = state("b", tenant="T1")
    policy.plan([b])
    assert policy.curve("d", request_id="b") == t1  # a new request of T1 starts from T1
    assert policy.curve("d", tenant="T2") == policy.curve("d")  # an unknown tenant uses the global curve


def test_decisions_are_deterministic():
    def trace(seed: int) -> list[tuple]:
        load = SyntheticLoad(batch=8, seed=11)
        policy = AtlasPolicy(["static", "adaptive", "suffix"], ControllerSettings(seed=seed))
        return [(r.step, r.request_id, r.drafter, r.k, r.drafted) for r in run(load, policy, 60)]

    assert trace(0) == trace(0)
    assert trace(0) != trace(5)  # the seed shifts the exploration rotation


def test_atlas_drives_the_real_engine_losslessly(tiny_target):
    """Protocol check on the reference engine (tiny random model): plan/feedback, trim via a drafter wrapper."""
    from adaspec.core.drafters.prompt_lookup import PromptLookupDrafter
    from adaspec.core.engine.engine import SpecEngine
    from adaspec.core.engine.sampling import SamplingParams

    target = dataclasses.replace(tiny_target, eos_token_ids=frozenset())
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 97) for _ in range(12)] * 2 for _ in range(3)]
    plain = SpecEngine(target, [PromptLookupDrafter(1, 3)], batch_size=3)
    ref = plain.generate(prompts, SamplingParams(max_new_tokens=24), FixedPolicy(None, 0))
    policy = AtlasPolicy(["prompt-lookup"], ControllerSettings(guarded=(), verify_fixed_s=1.0))

    class Trimmed(DrafterBase):  # what the proposed engine hook does, done from the drafter side
        def __init__(self, inner):
            self.inner, self.name, self.hidden_layers = inner, inner.name, inner.hidden_layers

        def start(self, r):
            self.inner.start(r)

        def observe(self, o):
            self.inner.observe(o)

        def finish(self, r):
            self.inner.finish(r)

        def propose(self, reqs, ks):
            return [d.truncated(policy.trim(r, self.name, d)) for r, d in zip(reqs, self.inner.propose(reqs, ks))]

    eng = SpecEngine(target, [Trimmed(PromptLookupDrafter(1, 3))], batch_size=3)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=24), policy)
    assert [r.output_tokens for r in out] == [r.output_tokens for r in ref]
    assert any(rec.drafter == "prompt-lookup" and rec.drafted for r in out for rec in r.records)
    assert policy.calibrators[0].evidence > 0


def test_a_batched_head_drafts_only_when_its_rows_pay_for_its_positions():
    """A head's chain positions cost per step (`draft_step`), shared by its rows: one row alone in a batch of
    four does not pay 40 ms per position for one 0.6 token, four rows together do; cheap positions always pay."""
    def ks(step_s: float, rows_with_room: int) -> list[int]:
        costs = CostModel(verify_fixed_s=0.1, verify_token_s=0.002, draft_costs={"static": 0.0},
                          draft_step_costs={"static": step_s}, frozen=True)
        pol = AtlasPolicy(["static"], ControllerSettings(guarded=(), explore_every=0, prior_acceptance=0.6),
                          costs=costs)
        states = [state(f"r{i}", max_new=10_000 if i < rows_with_room else 1) for i in range(4)]
        return [p.k for p in pol.plan(states)]

    assert ks(0.04, 1) == [0, 0, 0, 0]
    assert ks(0.04, 4) == [1, 1, 1, 1]
    assert ks(0.001, 1)[0] >= 3


def test_a_batched_heads_per_row_catch_up_is_learned_and_priced():
    """A head's propose first extends its cache over what the row committed since the head last drafted for
    it: the cost model learns that per-row overhead from the steps' drafting time beyond the chain, and a
    plan that paid while it was free no longer drafts with the head."""
    def learned(per_row_s: float) -> CostModel:
        costs = CostModel(verify_fixed_s=0.1, verify_token_s=0.002, draft_costs={"static": 0.001},
                          draft_step_costs={"static": 0.002})
        chain = 0.002 * 3 + 0.001 * 6  # 3 positions, 2 rows x 3 tokens
        for step in range(300):
            costs.observe([record(step, f"r{i}", "static", 3, 1, [0.6] * 3, batch=4, verify_s=0.11,
                                  draft_s=chain + 2 * per_row_s) for i in range(2)]
                          + [record(step, f"r{i}", None, 0, 0, [], batch=4, verify_s=0.11) for i in (2, 3)])
        return costs

    def ks(costs: CostModel) -> list[int]:
        pol = AtlasPolicy(["static"], ControllerSettings(guarded=(), explore_every=0, prior_acceptance=0.6),
                          costs=costs)
        return [p.k for p in pol.plan([state(f"r{i}") for i in range(4)])]

    free, dear = learned(0.0), learned(0.03)
    assert free.row_overhead("static") == pytest.approx(0.0, abs=1e-6)
    assert dear.row_overhead("static") == pytest.approx(0.03, rel=0.02)
    assert sum(ks(free)) > 0 and sum(ks(dear)) == 0
    assert dear.expected_step_time([3, 0], ["static", None]) == pytest.approx(
        free.expected_step_time([3, 0], ["static", None]) + 0.03, rel=1e-6)


def test_a_probe_takes_the_idle_row_not_a_planned_one():
    """Ragged, a probe replaces its row's own draft: with three rows planned on the suffix tree's peeked
    matches and one without a match, every probe of the idle head goes to the row without a match."""
    costs = CostModel(verify_fixed_s=0.1, verify_token_s=1e-4, draft_costs={"suffix": 0.0, "static": 0.002},
                      frozen=True)  # a static token never pays at 5% acceptance, so it is only ever probed
    pol = AtlasPolicy(["suffix", "static"], ControllerSettings(guarded=(), peek=("suffix",), peek_min_evidence=0,
                                                               explore_every=1, prior_acceptance=0.05), costs=costs)
    pol.set_padded_verify(False, 1)
    states = [state(f"r{i}") for i in range(4)]
    probed = []
    for step in range(24):
        pol.peeked("suffix", states, [Draft([5, 6, 7], [0.9, 0.9, 0.9])] * 3 + [Draft()])
        plans = pol.plan(states)
        if step:  # the first step probes both drafters (the suffix tree on the idle row)
            assert [p.drafter for p in plans[:3]] == ["suffix"] * 3
            probed += [i for i, p in enumerate(plans) if p.drafter == "static"]
    assert probed and set(probed) == {3}


@pytest.mark.parametrize("verify_token_s,acceptance", [(0.01, 0.5), (0.02, 0.6), (0.01, 0.8)])
def test_a_packed_step_spends_its_round_up_on_draft_tokens(verify_token_s, acceptance):
    """The reference engine fills a packed forward up to a multiple of 4 tokens, so up to that round-up a
    draft token costs no verification: the plan adds the likeliest ones (and never shortens a chain); an
    engine without a multiple (SGLang) gets the per-token plan."""
    def ks(multiple: int) -> list[int]:
        costs = CostModel(verify_fixed_s=0.1, verify_token_s=verify_token_s, draft_costs={"suffix": 0.0},
                          frozen=True)
        pol = AtlasPolicy(["suffix"], ControllerSettings(guarded=(), explore_every=0, prior_acceptance=acceptance),
                          costs=costs)
        pol.set_padded_verify(False, multiple)
        return [p.k for p in pol.plan([state(f"r{i}") for i in range(3)])]

    per_token, filled = ks(1), ks(4)
    assert sum(per_token) and (3 + sum(per_token)) % 4  # the per-token plan leaves a round-up unused
    assert (3 + sum(filled)) % 4 == 0 and all(f >= p for f, p in zip(filled, per_token))
    cm = CostModel(verify_token_s=0.01, draft_token_s=0.0, multiple=4)  # 3 pending + drafts, rounded up to 4
    assert cm.expected_step_time([1, 1, 1]) == cm.expected_step_time([2, 2, 1]) < cm.expected_step_time([2, 2, 2])


def test_peeking_in_the_engine_is_lossless_and_asks_the_cheap_drafter_once_per_step(tiny_target):
    from adaspec.core.drafters.prompt_lookup import PromptLookupDrafter
    from adaspec.core.engine.engine import SpecEngine
    from adaspec.core.engine.sampling import SamplingParams

    target = dataclasses.replace(tiny_target, eos_token_ids=frozenset())
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, 97) for _ in range(10)] * 3 for _ in range(3)]
    params = SamplingParams(max_new_tokens=24)
    ref = SpecEngine(target, [PromptLookupDrafter(1, 3)], batch_size=3).generate(prompts, params, FixedPolicy(None, 0))

    class Counting(PromptLookupDrafter):
        calls = 0

        def propose(self, reqs, ks):
            Counting.calls += 1
            return super().propose(reqs, ks)

    policy = AtlasPolicy(["prompt-lookup"], ControllerSettings(guarded=(), peek=("prompt-lookup",),
                                                               peek_min_evidence=0, verify_fixed_s=1.0))
    assert policy.peek == ("prompt-lookup",)
    eng = SpecEngine(target, [Counting(1, 3)], batch_size=3)
    out = eng.generate(prompts, params, policy)
    assert [r.output_tokens for r in out] == [r.output_tokens for r in ref]
    decode_steps = len({rec.step for r in out for rec in r.records if not rec.prefill})
    assert Counting.calls == decode_steps  # the plan reuses the peeked proposal
    assert any(rec.drafter == "prompt-lookup" and rec.accepted for r in out for rec in r.records)


# -- baselines -------------------------------------------------------------------------------------------------------


def _sglang_k_trace(policy: SGLangAdaptivePolicy, batch: int, accepted: list[int]) -> list[int]:
    """Plan, then feed back `accepted[i]` for every request of step i; returns the planned k per step."""
    states = [state(f"r{i}") for i in range(batch)]
    ks = []
    for step, a in enumerate(accepted, start=1):
        plans = policy.plan(states)
        k = plans[0].k
        ks.append(k)
        policy.feedback([record(step, s.request_id, plans[0].drafter, k, min(a, k), [0.9] * k, batch=batch)
                         for s in states])
    return ks


def test_sglang_adaptive_tier_switching_by_hand():
    # bs=1 slot: candidates [1, 3, 7], start 3, EMA 2.0, alpha 0.2, warmup 10, every 5, down hysteresis -0.25.
    # 15 x accept 3: EMA = 3 - 0.8**15 = 2.965 > 3 - 0.5 -> 7 (first decision at update 15).
    # then accept 0: update 20: EMA = 2.965 * 0.8**5 = 0.971 <= 3 - 0.5 - 0.25 -> 3 (> 0.25, stop);
    # update 25: 0.318 > 0.25 -> stay 3; update 30: 0.104 <= 0.25 -> 1.
    ks = _sglang_k_trace(SGLangAdaptivePolicy("static"), 1, [3] * 15 + [0] * 20)
    assert ks == [3] * 15 + [7] * 5 + [3] * 10 + [1] * 5


def test_sglang_adaptive_slots_and_zero_step_probe():
    # bs=8 slot: candidates [0, 1, 3], start 3, EMA 2.0; accept 0: update 15: EMA 0.070 <= 0.5 -> 0 (two tiers);
    # update 20 (no EMA change at 0 steps): probe -> 1; update 25: EMA 0.023 <= 0.5 -> 0; update 30: probe -> 1.
    ks = _sglang_k_trace(SGLangAdaptivePolicy("static"), 8, [0] * 32)
    assert ks == [3] * 15 + [0] * 5 + [1] * 5 + [0] * 5 + [1] * 2
    p = SGLangAdaptivePolicy("static")
    assert [p.params.get_steps_for_batch(b) for b in (1, 7, 8, 31, 32, 63, 64, 500)] == [3, 3, 3, 3, 1, 1, 0, 0]
    assert all(pl == Plan(None, 0) for pl in p.plan([state("x", pending=5)]))  # prefill: SGLang does not draft
    assert _sglang_k_trace(SGLangAdaptivePolicy("static"), 64, [5] * 40) == [0] * 40  # bs 64: never speculates


def test_step_overhead_is_measured_online_and_priced():
    """The per-step overhead engines report (planning, observe, logging: `overhead_s`) is learned online and
    enters every step's time: a draft token that does not pay against the forward alone pays once the step is
    known to cost more (the batch's tokens per second are lower, so a likely token is worth more of it)."""
    cm = CostModel(verify_fixed_s=0.01, verify_token_s=0.012, verify_request_s=0.0, draft_token_s=0.0)
    assert cm.overhead == 0.0
    for step in range(1, 200):
        cm.observe([dataclasses.replace(record(step, "r", None, 0, 0, []), overhead_s=0.05, verify_s=0.022)])
    assert cm.overhead == pytest.approx(0.05, rel=0.01)
    assert cm.expected_step_time([0]) == pytest.approx(cm.verify_time(1, 1) + 0.05)
    frozen = CostModel(verify_fixed_s=0.01, verify_token_s=0.012, frozen=True)
    frozen.observe([dataclasses.replace(record(1, "r", None, 0, 0, []), overhead_s=0.05)])
    assert frozen.overhead == 0.0  # a replay decides from its start-up costs alone

    def planned_k(overhead: float) -> int:
        costs = CostModel(verify_fixed_s=0.01, verify_token_s=0.012, draft_token_s=0.0, frozen=True)
        costs.overhead = overhead
        pol = AtlasPolicy(["static"], ControllerSettings(explore_every=10**6), costs=costs)
        return pol.plan([state("r")])[0].k

    assert planned_k(0.0) == 0  # prior 0.5 < 0.012 / (0.01 + 0.012): no token pays against the forward alone
    assert planned_k(0.05) > 0


def test_padded_verify_plans_the_batch_width():
    """The reference engine right-pads chains, so one row's long chain costs every row: a likely chain that pays
    for its own tokens (ragged, SGLang) does not pay for four rows' (padded), while four likely chains do."""

    def plan(padded: bool, likely_rows: int) -> list[int]:
        costs = CostModel(verify_fixed_s=0.05, verify_token_s=0.005, draft_token_s=0.0, frozen=True)
        pol = AtlasPolicy(["static"], ControllerSettings(explore_every=10**6), costs=costs)
        pol.set_padded_verify(padded)
        states = [state(f"r{i}") for i in range(4)]
        pol.plan(states)  # admits the requests
        for i in range(4):
            r = pol.requests[f"r{i}"]
            r.cum[0], r.seen[0] = [0.95 if i < likely_rows else 0.05] * 6, pol.step + 1
        return [p.k for p in pol.plan(states)]

    assert plan(padded=False, likely_rows=1) == [6, 0, 0, 0]
    assert plan(padded=True, likely_rows=1) == [0, 0, 0, 0]
    ks = plan(padded=True, likely_rows=4)
    assert len(set(ks)) == 1 and ks[0] > 0


def test_oracle_picks_the_hindsight_best():
    table = {"a": 5, "b": 1}
    cheap = CostModel(verify_fixed_s=0.01, verify_token_s=1e-5, draft_token_s=1e-6)
    oracle = OraclePolicy(["a", "b"], lambda st_, d, k: min(k, table[d]), costs=cheap, max_k=8)
    assert oracle.plan([state("r")]) == [Plan("a", 5)]
    dear = CostModel(verify_fixed_s=1e-4, verify_token_s=1e-2, draft_token_s=2e-3)
    oracle = OraclePolicy(["a", "b"], lambda st_, d, k: min(k, table[d]), costs=dear, max_k=8)
    assert oracle.plan([state(f"r{i}") for i in range(4)]) == [Plan(None, 0)] * 4


def test_make_policy_by_name():
    assert isinstance(make_policy("atlas"), AtlasPolicy)
    fixed = make_policy("fixed-suffix", k=3)
    assert fixed.plan([state("r")]) == [Plan("suffix", 3)]
    assert isinstance(make_policy("sglang-adaptive"), SGLangAdaptivePolicy)
    with pytest.raises(ConfigError):
        make_policy("nope")
    assert policy_drafters("atlas", ["none", "static", "suffix"]) == ["static", "suffix"]
    assert policy_drafters("sglang-adaptive", ["none"]) == ["static"]
    with pytest.raises(ConfigError):
        policy_drafters("nope", [])


# -- settings --------------------------------------------------------------------------------------------------------


def test_controller_settings_from_env(monkeypatch):
    monkeypatch.setenv("ADASPEC_CONTROLLER_MAX_K", "12")
    monkeypatch.setenv("ADASPEC_CONTROLLER_GUARDED", "adaptive, adaptive-2")
    s = load_controller_settings()
    assert s.max_k == 12 and s.guarded == ("adaptive", "adaptive-2")
    monkeypatch.setenv("ADASPEC_CONTROLLER_GUARDED", '["x"]')
    assert load_controller_settings().guarded == ("x",)


@pytest.mark.parametrize("field,value", [("max_k", 0), ("ema_request_alpha", 0.0), ("calib_bins", 1),
                                         ("fallback", "adaptive"), ("explore_k", 99)])
def test_bad_controller_settings_name_the_field(field, value):
    with pytest.raises(ConfigError) as exc:
        load_controller_settings(**{field: value})
    msg = str(exc.value)
    assert "invalid controller settings" in msg
    if field not in ("fallback", "explore_k"):  # cross-field checks name the model, not one field
        assert f"ADASPEC_CONTROLLER_{field.upper()}" in msg


def test_every_knob_has_a_default_and_a_description():
    s = ControllerSettings()
    for name, info in ControllerSettings.model_fields.items():
        assert info.description, name
        assert getattr(s, name) is not None


# -- batched drafters (a GPU head runs one forward per chain position for all its rows) --------------------------


def test_batched_draft_cost_is_per_position_for_the_whole_batch():
    cm = CostModel(verify_fixed_s=5e-3, verify_token_s=2e-5, verify_request_s=0.0, draft_costs={"suffix": 2e-5},
                   draft_step_costs={"head": 3e-4}, frozen=True)
    t = cm.expected_step_time([3, 5, 0, 2], ["head", "head", None, "suffix"])
    assert t == pytest.approx(5e-3 + 2e-5 * (10 + 4) + 5 * 3e-4 + 2 * 2e-5)
    assert cm.draft_cost("head") == 0.0 and cm.amortised_draft_cost("head", 4) == pytest.approx(3e-4 / 4)
    cm.observe_draft({"head": 8}, 1.0)  # learning does not touch given step costs
    assert cm.draft_step_cost("head") == 3e-4


def _warm_policy(costs: CostModel) -> AtlasPolicy:
    """r0 keeps getting long chains accepted, r1 about half a token: different request curves."""
    policy = AtlasPolicy(["head"], ControllerSettings(guarded=(), explore_every=0, max_k=6), costs=costs)
    for step in range(1, 40):
        policy.plan([state("r0"), state("r1")])
        policy.feedback([record(step, "r0", "head", 6, 6, [0.9] * 6, batch=2),
                         record(step, "r1", "head", 6, step % 2, [0.5] * 6, batch=2)])
    return policy


def test_rows_of_a_batched_drafter_fill_up_to_the_depth_the_batch_pays_for():
    step_s = 1e-3
    per_token = _warm_policy(CostModel(verify_fixed_s=5e-3, verify_token_s=2e-5, draft_costs={"head": step_s / 2},
                                       frozen=True))
    batched = _warm_policy(CostModel(verify_fixed_s=5e-3, verify_token_s=2e-5, draft_step_costs={"head": step_s},
                                     frozen=True))
    (a0, a1), (b0, b1) = (p.plan([state("r0"), state("r1")]) for p in (per_token, batched))
    assert a0.k == b0.k == 6  # the long chain sets the depth either way
    # the short one is priced its share of the head's steps per token alone, but the batch already runs 6 positions
    assert a1.k < b1.k <= 6, (a1.k, b1.k)


def test_arctic_hybrid_takes_the_suffix_draft_only_when_its_score_reaches_k():
    """Arctic Inference's rule: suffix when score (sum of cumulative probabilities) >= n_predict, else the model
    speculator at n_predict; a step with nothing peeked (prefill) goes to the speculator."""
    from adaspec.core.controller.baselines import ArcticHybridPolicy, suffix_score
    from adaspec.core.controller.registry import make_policy

    assert suffix_score(Draft([1, 2, 3], [1.0, 0.5, 0.5])) == pytest.approx(1.0 + 0.5 + 0.25)
    policy = make_policy("arctic-hybrid", k=3)
    assert isinstance(policy, ArcticHybridPolicy) and policy.peek == ("suffix",) and policy.peek_k >= 3
    reqs = [state("a"), state("b"), state("c")]
    strong = Draft(list(range(8)), [1.0] * 8)  # score 8 >= 3
    weak = Draft([1, 2, 3, 4], [0.9, 0.5, 0.5, 0.5])  # score 0.9 + 0.45 + 0.225 + 0.11 < 3
    policy.peeked("suffix", reqs, [strong, weak, Draft()])
    assert policy.plan(reqs) == [Plan("suffix", 8), Plan("static", 3), Plan("static", 3)]
    assert policy.plan(reqs) == [Plan("static", 3)] * 3  # nothing peeked this step
    policy.peeked("suffix", reqs[:1], [Draft([1, 2, 3], [1.0, 1.0, 1.0])])  # exactly k: suffix
    assert policy.plan(reqs[:1]) == [Plan("suffix", 3)]


def test_request_floor_keeps_rows_that_draft_nothing_from_paying_for_a_wide_step():
    """Padded verify: one row's long likely chain widens the step for all four; by goodput it pays (9.7
    tokens for 1.8 plain steps), but the three rows that draft nothing each pay 0.8 of a plain step for their
    one token (and 0.3 expected from their unlikely chains). With a floor of 2% of a 100-token budget (2 plain
    steps of slack) they allow a few such steps, narrower ones as the slack runs out, then none; off (inf, the
    default) it widens every step; at 0 it never does; and a row that has earned credit (its own drafts paid)
    lets the batch widen again."""

    def widths(floor: float, steps: int = 5, credit: float = 0.0) -> list[int]:
        costs = CostModel(verify_fixed_s=0.05, verify_token_s=0.002, draft_token_s=0.0, frozen=True)
        pol = AtlasPolicy(["static"], ControllerSettings(explore_every=10**6, request_floor_slack=floor),
                          costs=costs)
        pol.set_padded_verify(True)
        states = [state(f"r{i}", max_new=100) for i in range(4)]
        pol.plan(states)  # admits the requests
        for i in range(4):  # the admission step planned on the prior's curves: start the accounts afresh
            pol.requests[f"r{i}"].slack = floor * 100 + (credit if i else 0.0)
        out = []
        for _ in range(steps):
            for i in range(4):
                r = pol.requests[f"r{i}"]
                r.cum[0], r.seen[0] = [0.95 if i == 0 else 0.05] * 6, pol.step + 1
            out.append(max(p.k for p in pol.plan(states)))
        return out

    assert all(w > 0 for w in widths(math.inf))
    assert widths(0.0) == [0] * 5
    floored = widths(0.02)  # each row that drafts nothing likely pays 1.83 - 1.3 = 0.53 per width-6 step
    assert floored[0] == 6 and floored[-1] == 0, floored
    assert all(a >= b for a, b in zip(floored, floored[1:])), floored
    assert all(w > 0 for w in widths(0.02, credit=10.0))
