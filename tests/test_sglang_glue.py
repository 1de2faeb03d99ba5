"""The SGLang plugin's SGLang-free glue, with fakes where SGLang needs a GPU: chain drafts -> verify-input
tokens, the per-step runtime (plan, records, observations, logs), weight staging/apply ordering, the
non-blocking log sender, the hidden-state tap, pre-captured step states, settings and server-args rules."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import msgpack
import pytest
import torch
from prometheus_client import CollectorRegistry

from adaspec.core.controller import AtlasPolicy, ControllerSettings
from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.drafters.base import Draft, DrafterBase, DraftRequest, JoinedTokens
from adaspec.core.drafters.suffix import SuffixDrafter
from adaspec.core.step import Plan, PolicyBase, StepRecord
from adaspec.core.errors import ConfigError
from adaspec.core.heads.adaptive import AdaptiveConfig, AdaptiveHead
from adaspec.core.online.logs import LogPublisher
from adaspec.core.online.weights import WeightStager
from adaspec.core.online.wire import LogBatch, WeightUpdate, decode, entry_from_record
from adaspec.sglang_ext.chain import ChainStager, accepted_rows, batch_steps, chain_rows, overlay_chains
from adaspec.sglang_ext.hidden_tap import FinalHiddenTap, logits_forward_hook, TAP
from adaspec.core.online.sender import BackgroundSender, DeviceBudget, PublisherSink, StepLogs
from adaspec.sglang_ext.runtime import STATIC, AtlasRuntime, ReqView
from adaspec.sglang_ext.settings import load_plugin_settings
from adaspec.sglang_ext.spec import validate_atlas_args
from adaspec.sglang_ext.metrics import plugin_metrics
from adaspec.sglang_ext.states import RESTORE_SOURCE, StepStates, StickySteps, compact_overrides

# -- chain drafts -> verify input ----------------------------------------------------------------------------


def test_batch_steps_picks_smallest_covering_candidate():
    c = [0, 1, 2, 3, 4, 6, 8]
    assert batch_steps([], c) == 0
    assert batch_steps([0, 0], c) == 0
    assert batch_steps([1, 5, 2], c) == 6
    assert batch_steps([12], c) == 8  # cut to the largest
    assert batch_steps([2], [1, 3]) == 3
    with pytest.raises(ValueError):
        batch_steps([1], [])


def test_chain_rows_pad_with_last_token_and_mark_eagle_rows():
    tokens, use = chain_rows([[5, 6], None, [], [1, 2, 3, 4, 5]], 3, pads=[1, 2, 9, 4])
    # an empty chain repeats its request's last token (the root), not an arbitrary id
    assert tokens == [[5, 6, 6], [0, 0, 0], [9, 9, 9], [1, 2, 3]]
    assert use == [True, False, True, True]


def test_chain_stager_reuses_its_buffers_step_after_step():
    stager = ChainStager(4, 3, "cpu")
    buf = stager.dev.data_ptr()
    t1, u1 = stager.stage([[5, 6], None], 3, pads=[1, 2])
    assert t1.tolist() == [[5, 6, 6], [0, 0, 0]] and u1.tolist() == [True, False]
    t2, u2 = stager.stage([[7], [8, 9], []], 2, pads=[1, 2, 3])
    assert t2.tolist() == [[7, 7], [8, 9], [3, 3]] and u2.tolist() == [True, True, True]
    assert stager.dev.data_ptr() == buf and t2.data_ptr() >= buf  # views into the same buffer: no allocation
    t3, _ = stager.stage([[1]] * 6, 5)  # beyond the start-up sizes: the buffers grow, nothing is cut
    assert t3.shape == (6, 5) and t3[5].tolist() == [1] * 5


def test_overlay_keeps_eagle_rows_and_writes_chains():
    eagle = torch.tensor([[10, 11, 12], [20, 21, 22], [30, 31, 32]])
    out = overlay_chains(eagle, [None, [7], None], 3, "cpu")
    assert out.tolist() == [[10, 11, 12], [7, 7, 7], [30, 31, 32]]
    assert overlay_chains(eagle, [None, None, None], 3, "cpu") is eagle  # nothing to write: untouched
    assert overlay_chains(None, [[1, 2], [3]], 2, "cpu").tolist() == [[1, 2], [3, 3]]
    with pytest.raises(ValueError, match="need EAGLE"):
        overlay_chains(None, [[1], None], 2, "cpu")
    with pytest.raises(ValueError, match="EAGLE draft tokens"):
        overlay_chains(eagle, [None, None], 3, "cpu")


def test_accepted_rows_index_the_last_committed_position():
    assert accepted_rows([1, 3, 2], 4) == [0, 6, 9]


# -- the runtime ---------------------------------------------------------------------------------------------


class ScriptedPolicy(PolicyBase):
    """Plans from a script; records what it was given (the runtime's contract with AtlasPolicy)."""

    def __init__(self, plans, trim_to=None):
        self.plans, self.trim_to = plans, trim_to
        self.feedback_calls, self.finished, self.lam = [], [], 42.0

    def plan(self, rows):
        self.rows = rows
        return [self.plans.get(r.request_id, Plan(None, 0)) for r in rows]

    def trim(self, request, drafter, draft):
        return len(draft.tokens) if self.trim_to is None else self.trim_to

    def feedback(self, records):
        self.feedback_calls.append(list(records))

    def finish(self, rid):
        self.finished.append(rid)


class FakeDrafter(DrafterBase):
    def __init__(self, name, proposals=None, events=None):
        self.name, self.proposals, self.events = name, proposals or {}, events if events is not None else []
        self.started, self.finished_reqs, self.observed = [], [], []

    def start(self, req):
        self.started.append(req.request_id)

    def finish(self, req):
        self.finished_reqs.append((req.request_id, list(req.tokens)))

    def observe(self, obs):
        self.observed.extend(obs)

    def propose(self, reqs, ks):
        self.events.append(("propose", self.name))
        return [self.proposals.get(r.request_id, Draft()) for r in reqs]


def rv(rid, prompt=(1, 2, 3), output=(4,), tenant="t", max_new=100):
    return ReqView(rid, tenant, list(prompt), list(output), max_new)


def test_plan_assigns_static_rows_to_eagle_and_proposes_chains():
    pol = ScriptedPolicy({"a": Plan(STATIC, 2), "b": Plan("suffix", 5), "c": Plan(None, 0)})
    suf = FakeDrafter("suffix", {"b": Draft([7, 8, 9, 10, 11, 12], [0.9] * 6)})
    rt = AtlasRuntime(pol, {"suffix": suf}, [0, 1, 2, 3, 4, 6, 8])
    plan = rt.plan([rv("a"), rv("b"), rv("c")])
    assert plan.drafters == [STATIC, "suffix", STATIC]  # c had nothing: EAGLE runs anyway, so it rides along
    assert plan.chains[0] is None and plan.chains[2] is None
    assert plan.chains[1].tokens == [7, 8, 9, 10, 11]  # cut to k=5
    assert plan.steps == 6 and plan.uses_static
    assert pol.rows[0].pending == (4,) and pol.rows[0].tenant == "t"
    assert suf.started == ["a", "b", "c"]


def test_plan_without_static_rows_skips_eagle_and_trims():
    pol = ScriptedPolicy({"a": Plan("suffix", 4), "b": Plan(None, 0)}, trim_to=1)
    suf = FakeDrafter("suffix", {"a": Draft([5, 6, 7], [0.5, 0.4, 0.3])})
    rt = AtlasRuntime(pol, {"suffix": suf}, [0, 1, 3])
    plan = rt.plan([rv("a"), rv("b")])
    assert plan.chain_tokens() == [[5], []] and plan.steps == 1 and not plan.uses_static
    assert plan.drafters == ["suffix", None]


class PeekingPolicy(ScriptedPolicy):
    """Peeks the suffix drafter (as AtlasPolicy does) and records what it saw before planning."""

    peek, peek_k = ("suffix",), 6

    def peeked(self, drafter, rows, drafts):
        self.seen = (drafter, [r.request_id for r in rows], [list(d.tokens) for d in drafts])


def test_peeked_drafts_reach_the_policy_before_planning_and_are_not_proposed_twice():
    events = []
    pol = PeekingPolicy({"a": Plan("suffix", 2), "b": Plan(STATIC, 2)})
    suf = FakeDrafter("suffix", {"a": Draft([5, 6, 7, 8, 9, 10, 11], [0.9] * 7)}, events)
    rt = AtlasRuntime(pol, {"suffix": suf}, [0, 1, 2, 4])
    plan = rt.plan([rv("a"), rv("b")])
    assert pol.seen == ("suffix", ["a", "b"], [[5, 6, 7, 8], []])  # cut to the largest step candidate
    assert events == [("propose", "suffix")]  # one lookup per step, reused by the plan
    assert plan.chain_tokens()[0] == [5, 6] and plan.drafters == ["suffix", STATIC]


def test_atlas_policy_peeks_through_the_runtime():
    suf = FakeDrafter("suffix", {"a": Draft([5, 6, 7], [0.99] * 3)})
    pol = AtlasPolicy(["suffix"], ControllerSettings(peek_min_evidence=0, explore_every=0))
    rt = AtlasRuntime(pol, {"suffix": suf}, [0, 1, 3], static=False)
    plan = rt.plan([rv("a"), rv("b")])
    assert plan.drafters == ["suffix", None]  # b's suffix lookup came back empty: nothing to gain


def test_plan_with_nothing_to_draft_runs_zero_steps():
    rt = AtlasRuntime(ScriptedPolicy({}), {}, [0, 1, 3])
    plan = rt.plan([rv("a")])
    assert plan.steps == 0 and not plan.uses_static and plan.drafters == [None]


def test_plan_caps_k_at_the_largest_candidate_and_ignores_unknown_or_disabled_drafters():
    pol = ScriptedPolicy({"a": Plan(STATIC, 30), "b": Plan("nope", 2)})
    rt = AtlasRuntime(pol, {}, [0, 2, 4])
    plan = rt.plan([rv("a"), rv("b")])
    assert plan.ks == [4, 0] and plan.steps == 4
    rt2 = AtlasRuntime(ScriptedPolicy({"a": Plan(STATIC, 3)}), {}, [0, 3], static=False)
    assert rt2.plan([rv("a")]).steps == 0


def test_complete_records_what_each_drafter_proposed_not_the_padded_width():
    pol = ScriptedPolicy({"a": Plan(STATIC, 2), "b": Plan("suffix", 2), "c": Plan("suffix", 2)})
    suf = FakeDrafter("suffix", {"b": Draft([7, 8], [0.9, 0.6]), "c": Draft([9], [0.7])})
    rt = AtlasRuntime(pol, {"suffix": suf}, [0, 3])
    plan = rt.plan([rv("a", output=[4]), rv("b", output=[5]), rv("c", output=[6])])
    assert plan.steps == 3
    # verify input: per row the root then 3 drafts (b, c: their chains padded with their last token)
    verified = [4, 40, 41, 42, 5, 7, 8, 8, 6, 9, 9, 9]
    # a accepts 2 then bonus 99; b accepts its chain and one pad, then 77; c rejects its only token
    tokens = [40, 41, 99, 0, 7, 8, 8, 77, 55, 0, 0, 0]
    recs = rt.complete(plan, [3, 4, 1], tokens, verified)
    a, b, c = recs
    # EAGLE really drafted S tokens for a static row
    assert (a.drafter, a.k, a.drafted, a.accepted, a.emitted) == (STATIC, 3, 3, 2, 3)
    assert a.draft_tokens == [40, 41, 42] and a.emitted_tokens == [40, 41, 99] and a.confidence == [1.0] * 3
    # a chain row records its own chain: c proposed 1 token at k=2 (the reference engine's numbers), not
    # S=3 with zero-confidence padding the controller would learn as rejections
    assert (c.drafter, c.k, c.drafted, c.accepted, c.emitted) == ("suffix", 2, 1, 0, 1)
    assert c.draft_tokens == [9] and c.confidence == [0.7] and c.emitted_tokens == [55]
    # padding the target accepted was verified and is emitted: it counts as drafted and accepted
    assert (b.drafter, b.k, b.drafted, b.accepted, b.emitted_tokens) == ("suffix", 3, 3, 3, [7, 8, 8, 77])
    assert b.draft_tokens == [7, 8, 8] and b.confidence == [0.9, 0.6, 0.6]
    assert all(r.chunk_tokens == 4 and r.batch_size == 3 and not r.prefill for r in recs)
    assert pol.feedback_calls == [recs]
    for r in recs:  # every record passes the wire schema the sidecar applies
        entry_from_record(r)
    # the suffix drafter sees what entered the KV cache (root + accepted) and the next token
    assert [(o.request_id, o.tokens, o.next_token) for o in suf.observed] == [
        ("a", [4, 40, 41], 99), ("b", [5, 7, 8, 8], 77), ("c", [6], 55)]


def test_a_failing_drafter_falls_back_to_eagle_and_serving_goes_on():
    class Broken(FakeDrafter):
        def propose(self, reqs, ks):
            raise RuntimeError("drafter bug")

    pol = ScriptedPolicy({"a": Plan("broken", 2), "b": Plan(STATIC, 1)})
    rt = AtlasRuntime(pol, {"broken": Broken("broken")}, [0, 1, 4])
    plan = rt.safe_plan([rv("a"), rv("b")])
    assert plan.drafters == [STATIC, STATIC] and plan.chains == [None, None] and plan.steps == 4
    assert rt.plan_errors == 1
    rt.complete(plan, [1, 5], [9, 0, 0, 0, 0, 1, 2, 3, 4, 5], [4, 1, 1, 1, 1, 4, 1, 2, 3, 4])
    no_static = AtlasRuntime(pol, {"broken": Broken("broken")}, [0, 1, 4], static=False)
    assert no_static.safe_plan([rv("a")]).steps == 0


def test_complete_rejects_results_that_do_not_match_the_plan():
    rt = AtlasRuntime(ScriptedPolicy({"a": Plan(STATIC, 1)}), {}, [0, 1])
    plan = rt.plan([rv("a")])
    with pytest.raises(ValueError, match="do not match"):
        rt.complete(plan, [1, 1], [1, 2], [3, 4])
    with pytest.raises(ValueError, match="outside"):
        rt.complete(plan, [3], [1, 2], [3, 4])


def test_complete_feeds_adaptive_hidden_and_attaches_sampled_features():
    d = 8
    head = AdaptiveHead(AdaptiveConfig(hidden_size=d, vocab_size=50, inner_size=16), torch.randn(50, d),
                        torch.randn(50, d))
    ad = AdaptiveDrafter(head, collect=0)
    sent = []
    rt = AtlasRuntime(ScriptedPolicy({"a": Plan(STATIC, 2), "b": Plan(STATIC, 2)}), {"adaptive": ad}, [0, 2],
                      sender=SimpleNamespace(submit=sent.append), feature_sample_rate=1.0)
    plan = rt.plan([rv("a"), rv("b")])
    hidden = torch.arange(6 * d, dtype=torch.float32).view(6, d)
    recs = rt.complete(plan, [2, 1], [10, 11, 12, 20, 21, 22], [4, 10, 13, 4, 25, 26], hidden)
    # the adaptive drafter now drafts from the hidden row of each request's last committed position
    assert torch.equal(ad.states["a"].hidden, hidden[1]) and ad.states["a"].next_token == 11
    assert torch.equal(ad.states["b"].hidden, hidden[3]) and ad.states["b"].next_token == 20
    assert recs[0].features.shape == (2, d) and torch.equal(recs[0].features, hidden[0:2])
    hidden.zero_()  # the tap buffer is overwritten by the next verify: features must be copies
    assert recs[0].features.abs().sum() > 0
    assert isinstance(sent[0], StepLogs) and sent[0].records == recs


def test_feature_sampling_is_per_request_and_deterministic():
    rt = AtlasRuntime(ScriptedPolicy({}), {}, [0, 1], feature_sample_rate=0.5, seed=3)
    picks = [rt._sampled(f"req-{i}") for i in range(400)]
    assert picks == [rt._sampled(f"req-{i}") for i in range(400)]
    assert 140 < sum(picks) < 260


def test_sync_starts_new_and_finishes_departed_requests():
    pol = ScriptedPolicy({})
    suf = FakeDrafter("suffix")
    rt = AtlasRuntime(pol, {"suffix": suf}, [0, 1])
    out_a = [4]
    rt.plan([ReqView("a", "t", [1, 2, 3], out_a, 100), rv("b")])
    out_a.extend([5, 6])  # SGLang appends to the live array
    rt.plan([rv("b")])
    assert suf.finished_reqs == [("a", [1, 2, 3, 4, 5, 6])] and pol.finished == ["a"]
    rt.plan([rv("b"), rv("a")])  # back (e.g. retracted and re-prefilled): started again
    assert suf.started == ["a", "b", "a"]


def test_prefilled_requests_get_adaptive_state_at_next_plan():
    d = 4
    head = AdaptiveHead(AdaptiveConfig(hidden_size=d, vocab_size=20, inner_size=8), torch.randn(20, d),
                        torch.randn(20, d))
    ad = AdaptiveDrafter(head, collect=0)
    rt = AtlasRuntime(ScriptedPolicy({}), {"adaspec-x": FakeDrafter("x"), "adaptive": ad}, [0, 1])
    last = torch.ones(2, d)
    rt.prefilled([rv("a", output=[]), rv("b", output=[])], last, torch.tensor([7, 9]))
    assert "a" not in ad.states  # deferred: the device tensor is read once the scheduler synchronised
    rt.plan([rv("a", output=[7]), rv("b", output=[9])])
    assert ad.states["a"].next_token == 7 and ad.states["b"].next_token == 9
    assert torch.equal(ad.states["b"].hidden, last[1])


def test_real_atlas_policy_and_suffix_drafter_through_the_runtime():
    """End to end on CPU: a repetitive request gets suffix chains once the controller has seen acceptance."""
    pol = AtlasPolicy([STATIC, "suffix"], ControllerSettings(max_k=4, explore_k=2, guarded=()))
    suf = SuffixDrafter()
    rt = AtlasRuntime(pol, {"suffix": suf}, [0, 1, 2, 3, 4])
    prompt = [5, 6, 7, 8] * 8
    out: list[int] = []
    used = set()
    for _ in range(40):
        plan = rt.plan([ReqView("r", "t", prompt, out, 400)])
        S = plan.steps
        root = out[-1] if out else prompt[-1]
        row = plan.chains[0].tokens[:S] if plan.chains[0] is not None else []
        draft = (row + [row[-1]] * S)[:S] if row else [0] * S  # EAGLE rows: a bad static head
        truth = [prompt[(len(prompt) + len(out) + j) % 4] for j in range(S + 1)]
        a = 0
        while a < S and draft[a] == truth[a]:
            a += 1
        rt.complete(plan, [a + 1], truth[: a + 1] + [0] * (S - a), [root] + draft)
        out.extend(truth[: a + 1])
        used.add(plan.drafters[0])
    assert "suffix" in used
    assert out == [prompt[(len(prompt) + j) % 4] for j in range(len(out))]  # what the target said, always


# -- weights at batch start ----------------------------------------------------------------------------------


def test_weights_apply_in_place_at_batch_start_before_any_draft():
    d = 4
    head = AdaptiveHead(AdaptiveConfig(hidden_size=d, vocab_size=20, inner_size=8), torch.randn(20, d),
                        torch.randn(20, d))
    reg = CollectorRegistry()
    stager = WeightStager(head, "adaptive", registry=reg)
    ptrs = {n: p.data_ptr() for n, p in head.state_dict().items()}
    events = []

    class Probe(FakeDrafter):
        def propose(self, reqs, ks):
            events.append(("propose", float(head.up.weight.detach().flatten()[0])))
            return [Draft([1], [0.5]) for _ in reqs]

    sent = []
    rt = AtlasRuntime(ScriptedPolicy({"a": Plan("adaptive", 1)}), {"adaptive": Probe("adaptive")}, [0, 1],
                      stagers=[stager], sender=SimpleNamespace(submit=sent.append))
    new = {n: torch.full_like(t, 0.25) for n, t in head.state_dict().items()}
    assert stager.offer(WeightUpdate.build("adaptive", 1, new))  # arrives mid-step: staged, not applied
    assert float(head.up.weight.detach().flatten()[0]) != 0.25
    pause = rt.begin_batch()
    plan = rt.plan([rv("a")])
    assert pause > 0.0 and events == [("propose", 0.25)]  # the whole step drafts with the new version
    assert {n: p.data_ptr() for n, p in head.state_dict().items()} == ptrs  # in place: graphs stay valid
    rt.complete(plan, [1], [3, 0], [4, 1])
    assert [r.weight_version for r in sent[0].records] == [1]  # the logs say which version drafted the step
    assert rt.begin_batch() == 0.0  # nothing staged: nothing applied


# -- logs ----------------------------------------------------------------------------------------------------


def test_background_sender_never_blocks_and_counts_drops():
    gate = threading.Event()
    got, dropped = [], []
    sender = BackgroundSender(lambda recs: (gate.wait(5), got.append(recs)), maxsize=2, on_drop=dropped.append)
    t0 = time.perf_counter()
    results = [sender.submit([i]) for i in range(6)]  # the sink is stuck: the queue fills, then drops
    assert time.perf_counter() - t0 < 1.0
    assert results.count(False) >= 3 and sender.dropped_steps == results.count(False) and dropped
    gate.set()
    assert sender.drain(5)
    assert got and all(len(r) == 1 for r in got)
    sender.close()


def test_background_sender_survives_a_failing_sink():
    calls = []

    def sink(recs):
        calls.append(recs)
        raise RuntimeError("sidecar gone")

    sender = BackgroundSender(sink)
    assert sender.submit([1]) and sender.submit([2])
    assert sender.drain(5) and sender.errors == 2 and len(calls) == 2
    sender.close()


def test_publisher_sink_publishes_each_step_with_its_weight_version():
    wire = []
    pub = LogPublisher(lambda data: wire.append(data) or True, "srv", batch_entries=1, feature_sample_rate=1.0,
                       registry=CollectorRegistry())
    sink = PublisherSink(pub)

    def rec(step, feats, version):
        r = StepRecord(step=step, request_id="r", tenant="t", drafter="adaptive", k=2, drafted=2, accepted=1,
                       emitted=2, confidence=[0.5, 0.1], batch_size=1, chunk_tokens=3, draft_s=0.0, verify_s=0.0,
                       prefill=False, draft_tokens=[3, 4], emitted_tokens=[3, 9], weight_version=version)
        r.features = feats
        return r

    waited = []
    sink(StepLogs([rec(1, torch.ones(2, 4), 3)], SimpleNamespace(synchronize=lambda: waited.append(1))))
    assert waited == [1]  # device features: the sender waits for them, never the serving thread
    sink(StepLogs([rec(2, None, 4)]))
    batches = [decode(b, expect=LogBatch) for b in wire]
    assert [b.entries[0].weight_version for b in batches] == [3, 4]
    assert batches[0].entries[0].features.shape == [2, 4] and batches[1].entries[0].features is None
    assert msgpack  # wire format is msgpack (decode above)


# -- hidden tap ----------------------------------------------------------------------------------------------


class Mode:
    def __init__(self, verify):
        self.verify = verify

    def is_target_verify(self):
        return self.verify

    def is_extend(self):
        return True


def test_tap_copies_verify_rows_into_one_persistent_buffer():
    tap, owner, other = FinalHiddenTap(), object(), object()
    tap.bind(owner, 6, 3, torch.float32, "cpu")
    ptr = tap.buffer.data_ptr()
    h = torch.arange(12, dtype=torch.float32).view(4, 3)
    tap.record(other, h, SimpleNamespace(forward_mode=Mode(True)))  # the draft model's processor: ignored
    assert tap.verify_rows == 0
    tap.record(owner, h, SimpleNamespace(forward_mode=Mode(True)))
    assert torch.equal(tap.verify_hidden(4), h) and tap.buffer.data_ptr() == ptr
    tap.record(owner, torch.ones(9, 3), SimpleNamespace(forward_mode=Mode(True)))  # padded, wider than buffer
    assert tap.verify_rows == 6 and tap.buffer.data_ptr() == ptr


def test_tap_keeps_last_prompt_row_per_request_on_prefill():
    tap, owner = FinalHiddenTap(), object()
    tap.bind(owner, 4, 2, torch.float32, "cpu")
    h = torch.arange(14, dtype=torch.float32).view(7, 2)
    tap.record(owner, h, SimpleNamespace(forward_mode=Mode(False), extend_seq_lens=torch.tensor([3, 4])))
    assert tap.take_prefill().tolist() == [h[2].tolist(), h[6].tolist()] and tap.take_prefill() is None


def test_logits_hook_records_then_calls_the_original():
    owner = object()
    TAP.bind(owner, 4, 2, torch.float32, "cpu")
    h = torch.ones(2, 2)
    out = logits_forward_hook(lambda self, *a, **k: ("orig", a, k), owner, None, h, "head",
                              SimpleNamespace(forward_mode=Mode(True)))
    assert out[0] == "orig" and TAP.verify_rows == 2
    TAP.owner = None


# -- step states ---------------------------------------------------------------------------------------------


def test_step_states_build_missing_and_switch_once():
    calls = []
    worker = SimpleNamespace(
        build_adaptive_runtime_state=lambda **kw: calls.append(("build", kw)) or f"state{kw['speculative_num_steps']}",
        apply_runtime_state=lambda s: calls.append(("apply", s)),
    )
    st = StepStates(worker, [3, 0, 1])
    st.register(3, "initial")
    st.build_all([1, 2, 4])
    assert [c[1]["speculative_num_steps"] for c in calls] == [0, 1]
    assert calls[0][1] == {"speculative_num_steps": 0, "speculative_num_draft_tokens": 1, "cuda_graph_bs": [1, 2, 4]}
    calls.clear()
    st.activate(3)
    st.activate(1)
    st.activate(1)
    st.activate(3)
    assert calls == [("apply", "state1"), ("apply", "initial")]
    with pytest.raises(ValueError, match="steps=5"):
        st.activate(5)


# -- settings and server-args rules ----------------------------------------------------------------------------


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("ADASPEC_SGLANG_CANDIDATE_STEPS", "4,0,2")
    monkeypatch.setenv("ADASPEC_SGLANG_DRAFTERS", "static,suffix")
    s = load_plugin_settings()
    assert s.candidate_steps == (0, 2, 4) and s.max_steps == 4 and s.drafters == ("static", "suffix")


@pytest.mark.parametrize("env,value,msg", [
    ("ADASPEC_SGLANG_CANDIDATE_STEPS", "0", "one >= 1"),
    ("ADASPEC_SGLANG_CANDIDATE_STEPS", "1,1", "duplicates"),
    ("ADASPEC_SGLANG_DRAFTERS", "static,magic", "unknown drafters"),
    ("ADASPEC_SGLANG_FEATURE_SAMPLE_RATE", "2", "ADASPEC_SGLANG_FEATURE_SAMPLE_RATE"),
])
def test_bad_settings_name_the_env_var(monkeypatch, env, value, msg):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=msg):
        load_plugin_settings()


def server_args(**kw):
    base = dict(speculative_draft_model_path="/head", speculative_eagle_topk=None, speculative_num_steps=None,
                speculative_num_draft_tokens=None, speculative_adaptive=False,
                speculative_use_rejection_sampling=False, enable_dp_attention=False, enable_multi_layer_eagle=False,
                enable_two_batch_overlap=False, enable_pdmux=False, tp_size=1, pp_size=1,
                disable_overlap_schedule=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_validate_completes_args_for_chains():
    sa = server_args()
    validate_atlas_args(sa)
    assert (sa.speculative_eagle_topk, sa.speculative_num_steps, sa.speculative_num_draft_tokens) == (1, 8, 9)
    assert sa.disable_overlap_schedule is True


@pytest.mark.parametrize("kw,msg", [
    ({"speculative_draft_model_path": None}, "needs --speculative-draft-model-path"),
    ({"speculative_eagle_topk": 2}, "topk must be 1"),
    ({"speculative_num_steps": 5}, "ADASPEC_SGLANG_CANDIDATE_STEPS"),
    ({"speculative_num_draft_tokens": 4}, "num-draft-tokens 9"),
    ({"speculative_adaptive": True}, "ATLAS replaces it"),
    ({"speculative_use_rejection_sampling": True}, "drop it"),
    ({"enable_dp_attention": True}, "--enable-dp-attention"),
    ({"tp_size": 2}, "tp_size and pp_size must be 1"),
])
def test_validate_refuses_what_atlas_cannot_serve(kw, msg):
    with pytest.raises(ValueError, match=msg):
        validate_atlas_args(server_args(**kw))


# -- audit fixes: sticky states, quiet switches, guarded batch start, features, thresholds (F3, F4, F8, F12) ----


def test_sticky_steps_go_up_at_once_and_down_only_after_a_run_of_smaller_batches():
    c = StickySteps([0, 1, 2, 4, 8], downshift_after=3)
    assert c.choose([3]) == 4
    assert c.choose([7]) == 8  # up at once: a planned chain is never cut
    assert [c.choose([1]), c.choose([2])] == [8, 8]
    assert c.choose([5]) == 8  # still needs 8: the run of smaller batches starts again
    assert [c.choose([1]), c.choose([3]), c.choose([0])] == [8, 8, 4]  # down to the largest need of the run
    assert c.choose([0]) == 4 and c.choose([0]) == 4 and c.choose([0]) == 0
    eager = StickySteps([0, 2, 4], downshift_after=0)
    assert [eager.choose([4]), eager.choose([1]), eager.choose([0])] == [4, 2, 0]  # the old per-batch choice


def test_runtime_switches_state_rarely_on_alternating_plans():
    """A plan that alternates between a long and a short chain every step (what the controller does) costs
    one switch in all, not one per step; what runs always covers the plan."""
    pol = ScriptedPolicy({})
    rt = AtlasRuntime(pol, {}, [0, 1, 2, 4, 8], downshift_after=8)
    seen = []
    for i in range(64):
        pol.plans = {"a": Plan(STATIC, 7 if i % 2 else 1)}
        plan = rt.plan([rv("a")])
        assert plan.steps >= (7 if i % 2 else 1)
        seen.append(plan.steps)
    switches = sum(1 for x, y in zip(seen, seen[1:]) if x != y)
    assert switches <= 1, seen
    eager = AtlasRuntime(pol, {}, [0, 1, 2, 4, 8])  # the control: no hysteresis switches every step
    steps = []
    for i in range(8):
        pol.plans = {"a": Plan(STATIC, 7 if i % 2 else 1)}
        steps.append(eager.plan([rv("a")]).steps)
    assert steps == [1, 8] * 4


def replay(log):
    out = {}
    for _, fields in log:
        out.update(fields)
    return out


def test_override_log_stays_constant_under_switching_and_replays_the_same():
    log = [("startup", {"speculative_num_steps": 8, "mem_fraction_static": 0.8})]
    for steps in [4, 8, 2, 8, 4] * 200:
        log.append((RESTORE_SOURCE, {"speculative_num_steps": steps, "speculative_num_draft_tokens": steps + 1}))
        full = list(log)
        compact_overrides(log)
        assert replay(log) == replay(full)
    assert len(log) == 2 and log[0][0] == "startup"
    # an entry of another source between two switches stays, and so does what it sets
    log.append(("hicache", {"speculative_num_steps": 1}))
    log.append((RESTORE_SOURCE, {"speculative_num_steps": 2, "speculative_num_draft_tokens": 3}))
    before = list(log)
    assert compact_overrides(log) == 1 and replay(log) == replay(before) and ("hicache", {"speculative_num_steps": 1}) in log


def test_step_states_count_switches_and_call_back_after_each():
    seen = []
    worker = SimpleNamespace(apply_runtime_state=lambda s: None)
    st = StepStates(worker, [0, 2, 4], after_switch=lambda old, new: seen.append((old, new)))
    st.register(4, "s4")
    st.states.update({0: "s0", 2: "s2"})
    for steps in (4, 2, 2, 0, 4):
        st.activate(steps)
    assert seen == [(4, 2), (2, 0), (0, 4)] and st.switches == 3


def test_a_failing_batch_start_is_counted_and_serving_goes_on(caplog):
    class BadStager:
        drafter, version = "adaptive", 0

        def apply_if_staged(self):
            raise RuntimeError("NaN in a staged tensor")

    reg = CollectorRegistry()
    pm, _ = plugin_metrics(reg)
    rt = AtlasRuntime(ScriptedPolicy({}), {}, [0, 1], stagers=[BadStager()], metrics=pm)
    assert rt.safe_begin_batch() == 0.0 and rt.safe_begin_batch() == 0.0
    assert rt.begin_errors == 2 and "batch start failed" in caplog.text
    assert reg.get_sample_value("adaspec_sglang_glue_errors_total", {"where": "batch start"}) == 2
    with pytest.raises(RuntimeError):  # the unguarded call still says what went wrong
        rt.begin_batch()


def test_features_are_one_gather_within_the_device_budget_and_come_back_when_sent():
    d = 4
    sent = []
    budget = DeviceBudget(limit_bytes=3 * d * 4)  # room for 3 rows of float32 features
    reg = CollectorRegistry()
    pm, _ = plugin_metrics(reg)
    sender = SimpleNamespace(submit=lambda item: sent.append(item) or True)
    rt = AtlasRuntime(ScriptedPolicy({"a": Plan(STATIC, 2), "b": Plan(STATIC, 2)}), {}, [0, 2], sender=sender,
                      feature_sample_rate=1.0, feature_budget=budget, metrics=pm)
    plan = rt.plan([rv("a"), rv("b")])
    hidden = torch.arange(6 * d, dtype=torch.bfloat16).view(6, d)
    recs = rt.complete(plan, [2, 1], [10, 11, 12, 20, 21, 22], [4, 10, 13, 4, 25, 26], hidden)
    fa, fb = recs[0].features, recs[1].features
    assert fa.dtype == torch.float32 and torch.equal(fa, hidden[0:2].float()) and torch.equal(fb, hidden[3:4].float())
    assert fa.untyped_storage().data_ptr() == fb.untyped_storage().data_ptr()  # views into one gathered copy
    assert budget.held == 3 * d * 4 and sent[0].feature_bytes == 3 * d * 4
    recs2 = rt.complete(rt.plan([rv("a"), rv("b")]), [2, 1], [10, 11, 12, 20, 21, 22], [4, 10, 13, 4, 25, 26],
                        hidden)
    assert recs2[0].features is None and recs2[1].features is None  # budget full: logged without features
    assert rt.features_skipped == 2 and reg.get_sample_value("adaspec_sglang_log_features_skipped_total") == 2
    PublisherSink(lambda records: None)(sent[0])  # the sender thread shipped the first step
    assert budget.held == 0
    full = AtlasRuntime(ScriptedPolicy({"a": Plan(STATIC, 2)}), {}, [0, 2], feature_sample_rate=1.0,
                        sender=SimpleNamespace(submit=lambda item: False), feature_budget=budget)
    full.complete(full.plan([rv("a")]), [2], [10, 11, 12], [4, 10, 13], hidden[:3])
    assert budget.held == 0  # a step the queue dropped gives its bytes back at once


def test_validate_refuses_accept_thresholds_below_one():
    for flag in ("speculative_accept_threshold_single", "speculative_accept_threshold_acc"):
        with pytest.raises(ValueError, match="lossless only with --" + flag.replace("_", "-")):
            validate_atlas_args(server_args(**{flag: 0.5}))
    validate_atlas_args(server_args(speculative_accept_threshold_single=1.0, speculative_accept_threshold_acc=1.0))


def test_request_tokens_are_a_view_and_the_suffix_drafter_drafts_the_same_from_it():
    prompt, output = [5, 6, 7, 8] * 6, [5, 6]
    row = ReqView("r", "t", prompt, output, 100)
    view = row.tokens()
    assert isinstance(view, JoinedTokens) and view.prompt is prompt and view.output is output  # no copy
    assert list(view) == prompt + output and len(view) == 26 and view[-1] == 6 and view[23] == 8
    assert view[20:26] == (prompt + output)[20:26] and view[::5] == (prompt + output)[::5]
    with pytest.raises(IndexError):
        view[26]
    a, b = SuffixDrafter(), SuffixDrafter()
    for step in range(5):
        ra = DraftRequest("r", row.tokens(), len(prompt), "t")
        rb = DraftRequest("r", list(prompt) + list(output), len(prompt), "t")
        da, db = a.propose([ra], [4])[0], b.propose([rb], [4])[0]
        assert (da.tokens, da.confidence) == (db.tokens, db.confidence) and da.tokens
        output.append(prompt[(len(prompt) + len(output)) % 4])  # the live array grows; the view follows


def test_engine_metrics_sum_per_drafter_before_counting():
    reg = CollectorRegistry()
    _, em = plugin_metrics(reg)

    def rec(drafter, drafted, accepted, emitted):
        return StepRecord(step=1, request_id="r", tenant="t", drafter=drafter, k=drafted, drafted=drafted,
                          accepted=accepted, emitted=emitted, confidence=[0.5] * drafted, batch_size=3,
                          chunk_tokens=1, draft_s=0.0, verify_s=0.0, prefill=False)

    em([rec("suffix", 3, 2, 3), rec("suffix", 2, 0, 1), rec(None, 0, 0, 1)])
    get = reg.get_sample_value
    assert get("adaspec_engine_forwards_total", {"drafter": "suffix"}) == 2
    assert get("adaspec_engine_draft_tokens_total", {"drafter": "suffix"}) == 5
    assert get("adaspec_engine_accepted_tokens_total", {"drafter": "suffix"}) == 2
    assert get("adaspec_engine_emitted_tokens_total", {"drafter": "suffix"}) == 4
    assert get("adaspec_engine_forwards_total", {"drafter": "none"}) == 1
    assert get("adaspec_engine_draft_tokens_total", {"drafter": "none"}) is None
