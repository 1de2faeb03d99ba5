"""Drift benchmark: stream parsing, trace cache, exact replay (= live engine), metrics, CLI output."""

from __future__ import annotations

import json
import random

import pytest
import torch
from drafters_for_tests import NoisyOracleDrafter
from tiny_models import make_tiny_target

from adaspec.core.controller.policy import AtlasPolicy
from adaspec.core.drafters.suffix import SuffixDrafter
from adaspec.core.drift.step_costs import StepCosts, _fit_verify, measure_costs
from adaspec.core.drift.metrics import RequestOutcome, recovery, tau_of, windows
from adaspec.core.drift.replay_engine import TraceEngine
from adaspec.core.drift.stream import build_stream, parse_phase, PhaseSpec
from adaspec.core.drift.traces import TraceStore
from adaspec.core.engine.engine import RequestSpec, RequestState, SpecEngine
from adaspec.core.step import FixedPolicy
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.errors import RequestError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
#: Costs of the reference engine (padded verify, as measured costs are), so a replay models what runs live.
COSTS = StepCosts(a=0.03, b=0.004, c=0.001, draft={"noisy-oracle": 1e-4, "suffix": 2e-5, "static": 3e-3,
                                                     "adaptive": 2e-3}, padded=True)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_target()


def tiny_prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    # repeated motifs so suffix matching has something to find
    motifs = [[rng.randrange(3, VOCAB) for _ in range(5)] for _ in range(3)]
    return [[1] + motifs[i % 3] * 2 + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 6))] for i in range(n)]


# -- stream ------------------------------------------------------------------------------------------------------
def test_phase_parsing_and_stream_order(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"id": f"a{i}", "prompt": f"p{i}"}) + "\n\n" for i in range(6)))
    assert parse_phase(f"x={f}:2", 9) == PhaseSpec("x", f, 2)
    assert parse_phase(f"x={f}", 9).count == 9
    for bad in ("nonsense", f"={f}", "x=", f"x={tmp_path}/missing.jsonl", f"x={f}:0"):
        with pytest.raises(RequestError):
            parse_phase(bad, 1)
    stream = build_stream([PhaseSpec("x", f, 2), PhaseSpec("y", f, 1), PhaseSpec("x", f, 2)])
    assert [r.prompt for r in stream] == ["p0", "p1", "p2", "p3", "p4"]  # a repeated file continues
    assert [r.phase for r in stream] == ["x", "x", "y", "x#2", "x#2"]
    with pytest.raises(RequestError, match="only 6 prompts"):
        build_stream([PhaseSpec("x", f, 5), PhaseSpec("x", f, 2)])


# -- metrics -----------------------------------------------------------------------------------------------------
def _outs(taus: list[float], phase: str = "p") -> list[RequestOutcome]:
    return [RequestOutcome(i, phase, int(t * 10), 10, 1.0, 0.0, {}) for i, t in enumerate(taus)]


def test_the_code_stream_drifts_into_go_and_java_then_unseen_chat(data_dir):
    from adaspec.core.drift.stream import stream_phases

    phases = stream_phases("code", data_dir=data_dir)
    assert [(p.name, p.count) for p in phases] == [("mt_bench", 32), ("go_code", 64), ("java_code", 64),
                                                   ("mt_bench", 32)]
    stream = build_stream(phases)
    assert len(stream) == 192
    first = {r.prompt_id for r in stream if r.phase == "mt_bench"}
    back = {r.prompt_id for r in stream if r.phase == "mt_bench#2"}
    assert len(first) == len(back) == 32 and not first & back  # the return to chat is unseen traffic
    assert all("```go" in r.prompt for r in stream if r.phase == "go_code")
    assert all("```java" in r.prompt for r in stream if r.phase == "java_code")
    assert [p.count for p in stream_phases("code", per_phase=6, data_dir=data_dir)] == [6, 12, 12, 6]  # --quick
    with pytest.raises(RequestError, match="unknown stream"):
        stream_phases("nope", data_dir=data_dir)


def test_windows_tau_and_recovery():
    outs = _outs([1, 1, 2, 2, 3])
    assert windows(outs, 2) == [1.0, 2.0, 3.0]
    assert tau_of(outs) == pytest.approx(9 / 5)
    assert recovery(_outs([1, 1, 1, 3, 3, 3, 3, 3]), smooth=1) == 4  # plateau 3: first request >= 2.7
    assert recovery(_outs([3, 3, 3, 3])) == 1
    assert recovery(_outs([1, 1, 1, 1, 1, 1, 1, 5]), smooth=1) == 8  # never there before the last


def test_checks_on_tau_and_on_modeled_speed_can_disagree():
    """ATLAS drafting less than fixed-k static: lower tau, but less time for the same tokens."""
    from adaspec.core.drift.bench import acceptance

    def pol(tau, modeled):
        return {"tau": tau, "modeled_s": 2 * modeled, "windows": [tau, tau], "windows_modeled_s": [modeled, modeled],
                "phases": {p: {"tau": tau, "modeled_s": modeled} for p in ("a", "b")}}

    out = {"controller_us_per_request_step": 10.0,
           "policies": {"static": pol(1.30, 10.0), "suffix": pol(1.10, 9.9), "atlas": pol(1.25, 8.0),
                        "sglang-ema": pol(1.2, 9.5)}}
    acc = acceptance(out, ["a", "b"])
    assert acc["atlas_vs_static_min_window"] == pytest.approx(1.25 / 1.30) and not acc["pass"]["every_window_ge_1.0x"]
    gp = acc["goodput"]
    assert gp["atlas_vs_static_min_window"] == pytest.approx(10.0 / 8.0) and gp["pass"]["every_window_ge_1.0x"]
    assert gp["atlas_vs_best_single_min_phase"] == pytest.approx(9.9 / 8.0) and gp["pass"]["beats_sglang_ema"]


def test_verify_fit_recovers_linear_costs():
    samples = [(t, b, t > b, 0.01 + 0.002 * t + 0.0005 * b + (0.004 if t > b else 0.0))
               for t in (1, 4, 8, 16, 28) for b in (1, 4)]
    assert _fit_verify(samples) == pytest.approx((0.01, 0.002, 0.0005, 0.004), rel=1e-6)
    plain_only = [(t, b, False, 0.01 + 0.002 * t + 0.0005 * b) for t in (1, 4, 8) for b in (1, 4)]
    assert _fit_verify(plain_only) == pytest.approx((0.01, 0.002, 0.0005, 0.0), rel=1e-6, abs=1e-12)


def test_speculative_step_cost_is_learned_online_and_priced():
    """A forward that verifies any draft costs `s` more than its tokens say (measured here: the matmuls at more
    than one row per request); the RLS finds it, and the width planner drafts only where a batch's expected
    gain beats it."""
    from adaspec.core.controller import AtlasPolicy, ControllerSettings, CostModel

    import random

    rng = random.Random(3)
    cm = CostModel(verify_fixed_s=0.04, verify_token_s=0.001, verify_request_s=0.0)
    for _ in range(2000):
        B, w = rng.randint(1, 8), rng.randint(0, 3)  # w: draft tokens per row (padded width - 1)
        cm.observe_verify(B * (1 + w), B, 0.04 + 0.001 * B * (1 + w) + 0.002 * B + (0.013 if w else 0.0), w > 0)
    assert cm.s == pytest.approx(0.013, rel=0.1) and cm.b == pytest.approx(0.001, rel=0.15)

    def ks(curve_value: float) -> list[int]:
        costs = CostModel(verify_fixed_s=0.04, verify_token_s=0.001, verify_spec_s=0.013, draft_token_s=0.0,
                          frozen=True, padded=True)
        pol = AtlasPolicy(["suffix"], ControllerSettings(explore_every=10**6), costs=costs)
        states = [RequestState(RequestSpec([1, 2, 3], f"r{i}"), i, SamplingParams(max_new_tokens=100), None)
                  for i in range(4)]
        for st in states:
            st.pending = [3]
        pol.plan(states)
        for i in range(4):
            r = pol.requests[f"r{i}"]
            r.cum[0], r.seen[0] = [curve_value ** (j + 1) for j in range(6)], pol.step + 1
        return [p.k for p in pol.plan(states)]

    assert ks(0.2) == [0, 0, 0, 0]  # 4 x 0.2 expected tokens do not pay for a 13 ms speculative step
    assert min(ks(0.9)) > 0


def test_measure_costs_on_tiny_model(tiny):
    costs = measure_costs(tiny, {"suffix": SuffixDrafter()}, tiny_prompts(8), new_tokens=8, k=3)
    assert costs.a >= 0 and costs.b > 0 and costs.draft["suffix"] > 0
    assert costs.cost_model().frozen


# -- traces and exact replay -------------------------------------------------------------------------------------
def test_trace_store_records_once_and_matches_plain(tiny, tmp_path):
    prompts = tiny_prompts(5)
    store = TraceStore(tmp_path, tiny)
    traces = store.ensure(prompts, 20, [-1, 1], batch_size=2)
    files = sorted(store.dir.iterdir())
    assert len(files) == 5
    stamps = [f.stat().st_mtime_ns for f in files]
    again = store.ensure(prompts, 20, [1, -1])
    assert [f.stat().st_mtime_ns for f in sorted(store.dir.iterdir())] == stamps  # nothing re-recorded
    plain = SpecEngine(tiny, {}, batch_size=1).generate(prompts, SamplingParams(max_new_tokens=20),
                                                          FixedPolicy(None, 0))
    for tr, tr2, res in zip(traces, again, plain):
        assert tr.output == res.output_tokens == tr2.output
        assert tr.hidden.shape == (len(tr.tokens) - 1, 2, 64) and tr.hidden.dtype == torch.float32
        assert tr.layers == (-1, 1)


def _records(results):
    return [[(r.drafter, r.k, r.drafted, r.accepted, r.emitted, tuple(r.draft_tokens)) for r in g.records]
            for g in results]


@pytest.mark.parametrize("batch_size,ragged", [(1, True), (3, True), (3, False)])
def test_replay_equals_live_for_every_step(tiny, tmp_path, batch_size, ragged):
    """Same drafters, same policy, same steps: the trace engine reproduces the live engine record for record
    (replaying the live engine's verify mode: ragged, or right-padded)."""
    prompts = tiny_prompts(7)
    traces = TraceStore(tmp_path, tiny).ensure(prompts, 24, [-1])
    reference = {tuple(p): tr.output for p, tr in zip(prompts, traces)}
    params = SamplingParams(max_new_tokens=24)

    def run(engine_cls, **kw):
        drafters = {"noisy-oracle": NoisyOracleDrafter(reference, VOCAB, seed=5), "suffix": SuffixDrafter()}
        engine = engine_cls(tiny, drafters, batch_size=batch_size, **kw)
        if isinstance(engine, TraceEngine):
            engine.traces = {f"q{i}": tr for i, tr in enumerate(traces)}
        policy = AtlasPolicy(["noisy-oracle", "suffix"], costs=COSTS.cost_model())
        specs = [RequestSpec(list(p), f"q{i}") for i, p in enumerate(prompts)]
        return engine.generate(specs, params, policy)

    live = run(SpecEngine, ragged_verify=ragged)
    replay = run(TraceEngine, verify_time=COSTS.verify_time, padded_verify=not ragged)
    assert [g.output_tokens for g in replay] == [g.output_tokens for g in live]
    assert _records(replay) == _records(live)
    assert sum(r.accepted for g in live for r in g.records) > 0


def test_replay_refuses_sampling_and_missing_traces(tiny):
    engine = TraceEngine(tiny, {}, COSTS.verify_time)
    with pytest.raises(RequestError, match="greedy"):
        engine.generate([[1, 5, 6]], SamplingParams(max_new_tokens=4, temperature=0.7), FixedPolicy(None, 0))
    with pytest.raises(RequestError, match="no trace"):
        engine.generate([[1, 5, 6]], SamplingParams(max_new_tokens=4), FixedPolicy(None, 0))


# -- real model: replay == live with the hidden-state heads and online learning ---------------------------------
@pytest.mark.model
def test_real_model_replay_and_live_give_identical_tau(real_runtime, real_settings, real_traces, data_dir):
    from adaspec.core.controller.settings import ControllerSettings
    from adaspec.core.drift.runner import run_policy

    target = real_runtime.target
    stream = build_stream([PhaseSpec("chat", data_dir / "mt_bench.jsonl", 2),
                           PhaseSpec("code", data_dir / "code_edit.jsonl", 2)])
    prompts = [target.encode(r.prompt) for r in stream]
    traces = real_traces.get("mt_bench", 2, new_tokens=32)[1] + real_traces.get("code_edit", 2, new_tokens=32)[1]
    assert [tr.tokens[: tr.prompt_len] for tr in traces] == prompts
    settings = real_settings.model_copy(update={"cache_dir": real_settings.cache_dir})
    learner = {"batch_size": 16, "min_samples": 8, "replay_ratio": 2.0, "gate_every": 2, "gate_min_samples": 4,
               "holdout_fraction": 0.5}
    for name in ("static", "adaptive", "atlas"):
        runs = [run_policy(name, stream, prompts, traces, target, settings, ControllerSettings(), COSTS, 4, 2, 32,
                           live=live, learner_kwargs=learner, online_costs=False) for live in (False, True)]
        replay, live = runs
        assert replay.outputs == live.outputs == [tr.output for tr in traces], name
        assert [o.tau for o in replay.outcomes] == [o.tau for o in live.outcomes], name
        if name != "static":
            assert replay.learner["updates"] >= 1 and replay.learner == live.learner, name


@pytest.mark.model
def test_interleaved_live_runs_are_the_sequential_runs_stepped_in_turn(real_runtime, real_settings, data_dir):
    """`run_interleaved` (the live benchmark's default, so the machine's drift falls on every policy alike) only
    changes when each run steps, never what it does: outputs, per-request tau and drafter tokens equal those
    of the same runs one after another, and each step goes to the run that has emitted the fewest tokens."""
    from adaspec.core.controller.settings import ControllerSettings
    from adaspec.core.drift.runner import PolicyRunner, run_interleaved, run_policy

    target = real_runtime.target
    stream = build_stream([PhaseSpec("chat", data_dir / "mt_bench.jsonl", 2),
                           PhaseSpec("code", data_dir / "code_edit.jsonl", 2)])
    prompts = [target.encode(r.prompt) for r in stream]
    names = ("none", "suffix", "atlas")
    args = (stream, prompts, None, target, real_settings, ControllerSettings(), COSTS, 4, 2, 16)
    kw = dict(live=True, learn=False, online_costs=False)
    alone = [run_policy(n, *args, **kw) for n in names]
    runners = [PolicyRunner(n, *args, **kw) for n in names]
    order = []
    for r in runners:
        def step(r=r, inner=r.step):
            live = [x.emitted for x in runners if not x.session.idle]
            if not r.session.idle:  # (a finished run's last call only reports that it is done)
                order.append((r.name, r.emitted, min(live)))
            return inner()
        r.step = step
    together = run_interleaved(runners)
    for a, b in zip(alone, together):
        assert a.outputs == b.outputs, a.name
        assert [(o.tau, o.drafter_tokens) for o in a.outcomes] == [(o.tau, o.drafter_tokens) for o in b.outcomes]
    assert all(mine == least for _, mine, least in order)
    switches = sum(x[0] != y[0] for x, y in zip(order, order[1:]))
    assert switches > 10  # they really alternate, not one after another
    assert sum(sum(o.drafter_tokens.values()) for o in together[1].outcomes) > 0  # suffix drafted something


@pytest.mark.model
def test_cli_drift_json_plot_and_live_sidecar(data_dir, tmp_path):
    """The CLI end to end on a tiny stream: replay with every policy (JSON keys, PNG), then live with a real
    sidecar process (its JSON block); outputs identical across policies (exit 0)."""
    import subprocess
    import sys

    phases = ["--phase", f"chat={data_dir / 'mt_bench.jsonl'}:2", "--phase", f"code={data_dir / 'code_edit.jsonl'}:2"]
    common = [sys.executable, "-m", "adaspec.core.cli", "bench", "drift", *phases, "--max-new-tokens", "16",
              "--window", "2", "--costs", "gpu-small-model"]
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    r = subprocess.run([*common, "--json", str(out), "--plot", str(png)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert set(d["policies"]) == {"none", "static", "suffix", "adaptive", "sglang-ema", "arctic-hybrid", "atlas",
                                  "oracle"}
    assert "atlas_vs_every_policy_min_phase" in d["acceptance"] and "atlas_minus_arctic_hybrid_tau" in d["acceptance"]
    for pol in d["policies"].values():
        assert set(pol["phases"]) == {"chat", "code"} and len(pol["windows"]) == 2 and pol["tau"] >= 1.0
        assert all(p["tau"] >= 1.0 for p in pol["phases"].values())
    assert d["controller_us_per_request_step"] > 0 and all(d["identical_outputs"].values())
    assert all(len(p["windows_modeled_s"]) == 2 for p in d["policies"].values())
    assert set(d["acceptance"]["goodput"]["pass"]) == set(d["acceptance"]["pass"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    live = tmp_path / "live.json"
    import os

    r = subprocess.run([*common, "--live", "--sidecar", "--policy", "none", "--policy", "adaptive", "--profile",
                        "--json", str(live)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forward" in r.stdout and "learner updates / drafter's earned share / cores" in r.stdout  # --profile
    d = json.loads(live.read_text())
    assert d["mode"] == "live" and isinstance(d["sidecar"]["versions_applied"], list)
    assert d["sidecar"]["logs_dropped"] == 0 and all(d["identical_outputs"].values())
    learner = d["policies"]["adaptive"]["sidecar"]  # what the co-located learner did, and the share it earned
    assert isinstance(learner["learner_updates"], int) and 0.0 <= learner["learner_earned_fraction"] <= 1.0
    assert 0.0 < learner["learner_cpu_share"] <= 0.25
    assert all(p["wall_tok_s"] > 0 for p in d["policies"]["adaptive"]["phases"].values())
    # the policies ran interleaved, and the profile splits by phase without losing a step
    assert d["stream"]["interleaved"] is True and "per phase (the batch's oldest request's)" in r.stdout
    prof = d["policies"]["adaptive"]["profile"]
    assert set(prof["phases"]) <= set(d["policies"]["adaptive"]["phases"])
    assert sum(p["steps"] for p in prof["phases"].values()) == prof["steps"] > 0
    assert sum(p["prefills"] for p in prof["phases"].values()) == prof["prefills"]


def test_shorter_budget_reuses_a_longer_trace(tiny, tmp_path):
    prompts = tiny_prompts(3)
    store = TraceStore(tmp_path, tiny)
    long = store.ensure(prompts, 64, [-1])
    short = store.ensure(prompts, 10, [-1])
    assert len(list(store.dir.iterdir())) == 3  # nothing new recorded
    for lt, st in zip(long, short):
        assert st.output == lt.output[:10] and st.hidden.shape[0] == len(st.tokens) - 1
        assert torch.equal(st.hidden, lt.hidden[: len(st.tokens) - 1])
