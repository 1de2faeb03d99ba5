"""Sidecar building blocks on tiny models: stream stitching, replay buffer, gate, rollback rule, checkpoints."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch

from adaspec.kernels import dispatch
from adaspec.core.step import FixedPolicy
from adaspec.core.errors import ConfigError
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.heads.adaptive import IGNORE, AdaptiveFeatures, AdaptiveHead
from adaspec.core.online.wire import AdminReply, LogBatch, StepEntry, tensor_to_blob
from adaspec.core.heads.adaptive_base import read_base, write_base
from adaspec.sidecar.checkpoint import CheckpointError, CheckpointStore, TrainerState, VersionRecord, export_head
from adaspec.sidecar.gate import decide, estimate_tau, replay_accepted
from adaspec.sidecar.buffer import ReplayBuffer
from adaspec.sidecar.samples import StreamAssembler
from adaspec.sidecar.served import ServedStats
from adaspec.sidecar.settings import SidecarSettings, load_sidecar_settings
from adaspec.sidecar.trainer import Trainer
from sidecar_helpers import VOCAB, capture_entries, chaotic_target, engine_with_adaptive

W = 3


@pytest.fixture(scope="module")
def target():
    return chaotic_target()


def _key(hidden: torch.Tensor, token: int, targets: torch.Tensor) -> tuple:
    return (hidden.numpy().tobytes(), int(token), tuple(int(t) for t in targets))


def _keys(feats: AdaptiveFeatures, targets: torch.Tensor) -> collections.Counter:
    return collections.Counter(_key(feats.hidden[i], feats.tokens[i], targets[i]) for i in range(len(feats)))


@pytest.fixture(scope="module")
def logged(target):
    """Entries of a real engine run (batch 3, 5 requests of different lengths) + the drafter's own experience."""
    engine, drafter = engine_with_adaptive(target, inner_size=32, collect=10**6, unroll=W, batch_size=3)
    torch.nn.init.normal_(drafter.head.down.weight, std=0.5)  # some drafts get accepted, some not
    entries = capture_entries(engine)
    prompts = [[1, 5, 9], [1, 7, 7, 30, 41, 2 + 50], [1, 60], [1, 11, 12, 13, 14], [1, 90, 3, 4]]
    engine.generate(prompts, SamplingParams(max_new_tokens=20), FixedPolicy("adaptive", 3))
    feats, targets = drafter.take_experience()
    return entries, feats, targets, len(prompts)


def _consistent(feats, targets, exp_feats, exp_targets) -> bool:
    """Every sample is a drafter sample; its targets are the drafter's, possibly cut short (IGNORE suffix)."""
    truth = {(exp_feats.hidden[i].numpy().tobytes(), int(exp_feats.tokens[i])): exp_targets[i] for i in range(len(exp_feats))}
    for i in range(len(feats)):
        want = truth.get((feats.hidden[i].numpy().tobytes(), int(feats.tokens[i])))
        if want is None:
            return False
        known = targets[i] != IGNORE
        n = int(known.sum())
        if not bool(known[:n].all()) or not torch.equal(targets[i][:n], want[:n]):
            return False
    return True


def _all_samples(asm: StreamAssembler, batches: list[LogBatch]):
    out = []
    for b in batches:
        out += asm.add_batch(b)
    out += asm.flush_all()
    hidden = torch.cat([s.hidden for s in out])
    tokens = torch.cat([s.tokens for s in out])
    targets = torch.cat([s.targets for s in out])
    return AdaptiveFeatures(hidden, tokens), targets


def test_stitched_streams_are_exactly_the_drafters_own_training_samples(logged):
    """Every sample rebuilt from logs is one the in-process drafter would train on, with the same targets;
    the drafter has one more per request (its root inside the prompt, whose token the logs do not carry)."""
    entries, exp_feats, exp_targets, n_requests = logged
    assert any(e.accepted for e in entries) and any(e.drafted > e.accepted for e in entries)
    asm = StreamAssembler(64, VOCAB, W)
    batches = [LogBatch(server_id="s", seq=i, entries=entries[i * 4: i * 4 + 4]) for i in range(len(entries) // 4 + 1)]
    feats, targets = _all_samples(asm, [b for b in batches if b.entries] )
    mine, theirs = _keys(feats, targets), _keys(exp_feats, exp_targets)
    assert not mine - theirs
    assert sum((theirs - mine).values()) == n_requests
    assert not asm.rejected and not asm.streams


def test_a_lost_batch_breaks_streams_instead_of_joining_non_consecutive_steps(logged):
    entries, exp_feats, exp_targets, _ = logged
    asm = StreamAssembler(64, VOCAB, W)
    half = len(entries) // 2
    b0 = LogBatch(server_id="s", seq=0, entries=entries[:half])
    b2 = LogBatch(server_id="s", seq=2, entries=entries[half + 3:])  # seq 1 (3 entries) lost
    feats, targets = _all_samples(asm, [b0, b2])
    assert asm.gaps["s"] == 1
    assert _consistent(feats, targets, exp_feats, exp_targets)  # nothing wrong was stitched
    # a sample whose targets span the gap would be wrong: they were cut (IGNORE-padded) instead
    full = _all_samples(StreamAssembler(64, VOCAB, W), [LogBatch(server_id="s", seq=0, entries=entries)])
    assert int((targets == IGNORE).sum()) > int((full[1] == IGNORE).sum())


def test_unsampled_entries_break_the_stream(logged):
    entries, exp_feats, exp_targets, _ = logged
    holes = [e if i % 3 else e.model_copy(update={"features": None}) for i, e in enumerate(entries)]
    asm = StreamAssembler(64, VOCAB, W)
    feats, targets = _all_samples(asm, [LogBatch(server_id="s", seq=0, entries=holes)])
    assert 0 < len(feats) < len(exp_feats)
    assert _consistent(feats, targets, exp_feats, exp_targets)


def _decode_entry(rows: int, accepted: int = 1, **kw) -> StepEntry:
    base = dict(step=1, request_id="r", tenant="t", drafter="adaptive", k=3, drafted=2, accepted=accepted,
                emitted=accepted + 1, draft_tokens=[5, 6], emitted_tokens=[5, 6][: accepted] + [7],
                confidence=[], weight_version=0, features=tensor_to_blob(torch.randn(rows, 64)))
    base.update(kw)
    return StepEntry(**base)


@pytest.mark.parametrize("bad,reason", [
    (dict(features=tensor_to_blob(torch.full((2, 64), float("nan")))), "features_nonfinite"),
    (dict(features=tensor_to_blob(torch.tensor([[1.0] * 64, [float("inf")] * 64]))), "features_nonfinite"),
    (dict(features=tensor_to_blob(torch.randn(2, 63))), "features_shape"),
    (dict(features=tensor_to_blob(torch.randn(3, 64))), "features_shape"),  # decode rows must be accepted + 1
    (dict(features=tensor_to_blob(torch.randn(2, 64, 1))), "features_shape"),
    (dict(features=tensor_to_blob(torch.ones(2, 64, dtype=torch.int64))), "features_dtype"),
    (dict(emitted_tokens=[5, VOCAB + 3]), "token_range"),
])
def test_hostile_entries_are_rejected_counted_and_yield_nothing(bad, reason):
    asm = StreamAssembler(64, VOCAB, W)
    good = [_decode_entry(2, step=i) for i in range(6)]
    out = asm.add_batch(LogBatch(server_id="s", seq=0, entries=good[:3] + [_decode_entry(2, **bad)] + good[3:]))
    out += asm.flush_all()
    assert asm.rejected == {reason: 1}
    n = sum(len(s) for s in out)
    assert n == 2 * 3 - 1 + 2 * 3 - 1  # the bad entry broke the stream in two; nothing of it is used
    assert all(torch.isfinite(s.hidden).all() for s in out)


def test_holdout_split_is_per_request_and_about_the_fraction():
    asm = StreamAssembler(64, VOCAB, W, holdout_fraction=0.2)
    flags = [asm.is_heldout("srv", f"req-{i}") for i in range(2000)]
    assert 0.17 < sum(flags) / len(flags) < 0.23
    assert flags == [asm.is_heldout("srv", f"req-{i}") for i in range(2000)]  # stable


# -- replay buffer ----------------------------------------------------------------------------------------------


def _samples(tenant: str, n: int, start: int = 0, heldout: bool = False):
    from adaspec.sidecar.samples import Samples

    ids = torch.arange(start, start + n)
    hidden = ids.float().unsqueeze(1).expand(n, 4).clone()
    return Samples(tenant, heldout, hidden, ids % VOCAB, torch.stack([ids, ids + 1], 1))


def test_replay_buffer_is_bounded_per_tenant_and_evicts_oldest():
    buf = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=300, max_tenants=2)
    for i in range(10):
        buf.add(_samples("a", 70, start=i * 70))
    assert buf.fill() == {"a": 300}
    kept = set(buf.rings["a"].hidden[:, 0].long().tolist())
    assert kept == set(range(700 - 300, 700))  # the newest 300
    buf.add(_samples("b", 10))
    buf.add(_samples("c", 10))  # a is the least recently fed: evicted
    assert set(buf.fill()) == {"b", "c"} and len(buf) == 20
    buf.add(_samples("b", 1000, start=5000))  # more than capacity in one go: the newest fit
    assert buf.fill()["b"] == 300 and buf.rings["b"].hidden[:, 0].max() == 5999


def test_replay_sampling_prefers_recent_samples_and_balances_tenants():
    buf = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=4000, half_life=500, tenant_balance=1.0, seed=0)
    buf.add(_samples("big", 4000))
    buf.add(_samples("small", 100, start=10_000))
    feats, _ = buf.sample(4000)
    ids = feats.hidden[:, 0]
    from_small = int((ids >= 10_000).sum())
    assert 1700 < from_small < 2300  # balance 1.0: tenants equally likely
    big = ids[ids < 10_000]
    assert float(big.mean()) > 3000  # half-life 500: mostly the newest of 4000
    buf.tenant_balance = 0.0
    feats, _ = buf.sample(4000)
    assert int((feats.hidden[:, 0] >= 10_000).sum()) < 250  # by size: ~100/4100


def test_newest_returns_most_recent_per_tenant():
    buf = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=1000)
    buf.add(_samples("a", 500))
    buf.add(_samples("b", 500, start=1000))
    feats, targets = buf.newest(100)
    ids = sorted(feats.hidden[:, 0].long().tolist())
    assert ids == list(range(450, 500)) + list(range(1450, 1500))
    assert targets.shape == (100, 2)


def test_replay_buffer_state_round_trips_and_fits_a_smaller_capacity():
    """What a checkpoint keeps: a restored buffer holds the same samples, counters and recency order, and goes
    on wrapping where it stopped; restored into a smaller capacity it keeps the newest; another layout is refused."""
    buf = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=300, max_tenants=3)
    for i in range(7):
        buf.add(_samples("a", 70, start=i * 70))  # wrapped
    buf.add(_samples("b", 50, start=5000))  # not wrapped
    tensors, layout = buf.state()
    json.dumps(layout)  # the layout goes into the manifest
    back = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=300, max_tenants=3)
    back.load_state(tensors, layout)
    assert back.fill() == buf.fill() and back.added == buf.added
    for t in ("a", "b"):
        for name in ("hidden", "tokens", "targets", "stamps"):
            assert torch.equal(getattr(back.rings[t], name)[: buf.rings[t].size],
                               getattr(buf.rings[t], name)[: buf.rings[t].size])
    assert torch.equal(back.newest(40)[0].hidden, buf.newest(40)[0].hidden)
    for b in (buf, back):
        b.add(_samples("a", 30, start=9000))
    assert torch.equal(back.rings["a"].hidden, buf.rings["a"].hidden)  # wraps on where it stopped
    small = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=100, max_tenants=1)
    small.load_state(tensors, layout)
    assert small.fill() == {"b": 50}  # max_tenants 1: the most recently fed tenant
    small = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=100, max_tenants=3)
    small.load_state(tensors, layout)
    assert small.fill() == {"a": 100, "b": 50}
    assert sorted(small.rings["a"].hidden[:, 0].long().tolist()) == list(range(390, 490))  # the newest 100
    small.add(_samples("a", 1, start=7777))  # overwrites the oldest kept (390)
    assert 390 not in small.rings["a"].hidden[:, 0].long().tolist()
    other = ReplayBuffer(hidden_size=8, width=2, tenant_capacity=300)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state(tensors, layout)
    assert len(other) == 0


# -- gate -------------------------------------------------------------------------------------------------------


def _head(target, seed=0):
    head = AdaptiveHead.for_target(target, inner_size=32, seed=seed)
    torch.nn.init.normal_(head.down.weight, std=0.3)
    return head


def test_gate_replay_counts_the_matching_prefix_of_each_chain(target):
    head = _head(target)
    g = torch.Generator().manual_seed(0)
    feats = AdaptiveFeatures(torch.randn(50, 64, generator=g), torch.randint(3, VOCAB, (50,), generator=g))
    ids, _ = head.draft(feats.hidden, feats.tokens, 4)
    assert replay_accepted(head, feats, ids, 4).tolist() == [4] * 50  # its own chains: all accepted
    assert estimate_tau(head, feats, ids, 4) == 5.0
    wrong = ids.clone()
    wrong[:, 2] = (wrong[:, 2] + 1) % VOCAB  # third token always wrong
    assert replay_accepted(head, feats, wrong, 4).tolist() == [2] * 50
    wrong[:10, 0] = IGNORE  # unknown target: the chain cannot be credited
    assert replay_accepted(head, feats, wrong, 4).tolist() == [0] * 10 + [2] * 40


def test_gate_publishes_only_a_real_improvement(target):
    good, other = _head(target, 0), _head(target, 1)
    g = torch.Generator().manual_seed(1)
    feats = AdaptiveFeatures(torch.randn(64, 64, generator=g), torch.randint(3, VOCAB, (64,), generator=g))
    targets, _ = good.draft(feats.hidden, feats.tokens, 4)
    d = decide(good, other, feats, targets, 4, margin=0.01, min_samples=32)
    assert d.publish and d.candidate_tau == 5.0 and d.serving_tau < 5.0
    assert not decide(other, good, feats, targets, 4, 0.01, 32).publish
    assert not decide(good, good, feats, targets, 4, 0.0, 32).publish  # equal is not better
    few = decide(good, other, AdaptiveFeatures(feats.hidden[:8], feats.tokens[:8]), targets[:8], 4, 0.01, 32)
    assert not few.publish and "held-out" in few.reason


# -- served stats / rollback rule -------------------------------------------------------------------------------


def _served_entry(version: int, drafted: int, accepted: int, tenant: str = "t") -> StepEntry:
    return StepEntry(step=1, request_id="r", tenant=tenant, drafter="adaptive", k=drafted, drafted=drafted,
                     accepted=accepted, emitted=accepted + 1, draft_tokens=[], emitted_tokens=[], confidence=[],
                     weight_version=version)


def test_rollback_rule_needs_evidence_and_a_real_drop():
    st = ServedStats("adaptive", window=1000)
    st.add("s", [_served_entry(1, 4, 2) for _ in range(100)])  # v1: 0.5 over 400 tokens
    st.add("s", [_served_entry(2, 4, 1) for _ in range(20)])  # v2: 0.25 but only 80 tokens
    assert st.rollback_reason(2, 1, min_drafted=200, margin=0.1) is None
    st.add("s", [_served_entry(2, 4, 1) for _ in range(40)])
    reason = st.rollback_reason(2, 1, min_drafted=200, margin=0.1)
    assert reason is not None and "v2" in reason and "v1" in reason
    st.add("s", [_served_entry(3, 4, 2) for _ in range(60)])  # v3 as good as v1: stays
    assert st.rollback_reason(3, 1, 200, 0.1) is None
    other = [e.model_copy(update={"drafter": "suffix"}) for e in [_served_entry(3, 4, 0)] * 500]
    st.add("s", other)  # other drafters never count
    assert st.acceptance(3) == (0.5, 240)
    assert st.tenants["t"][2].tau == 2.0 and st.servers["s"][0] == 3


def test_one_forged_batch_cannot_force_a_rollback():
    """D18: one forged served-acceptance batch forced an automatic rollback v12->v13. A rollback now needs each
    version's evidence from `min_requests` distinct requests, and an entry whose counts disagree with its own
    tokens (accepted drafts that are not what was emitted) is refused by the schema."""
    st = ServedStats("adaptive", window=4096)
    honest = [_served_entry(1, 4, 2).model_copy(update={"request_id": f"r{i}"}) for i in range(100)]
    st.add("s", honest)  # v1: 0.5 from 100 requests
    st.add("s", [_served_entry(2, 4, 2).model_copy(update={"request_id": f"q{i}"}) for i in range(10)])
    forged = [_served_entry(2, 4, 0) for _ in range(500)]  # v2 "collapses" -- all from one request id
    st.add("forger", forged)
    assert st.acceptance(2)[0] < 0.1 and st.versions[2].requests == 11
    assert st.rollback_reason(2, 1, min_drafted=200, margin=0.1, min_requests=8) is not None  # 11 requests: real
    st2 = ServedStats("adaptive", window=4096)
    st2.add("s", honest)
    st2.add("forger", forged)  # v2's evidence is one request's entries: no decision
    assert st2.rollback_reason(2, 1, min_drafted=200, margin=0.1, min_requests=8) is None
    assert st2.rollback_reason(2, 1, min_drafted=200, margin=0.1, min_requests=1) is not None  # the control
    with pytest.raises(ValueError, match="differ from the draft"):
        StepEntry(step=1, request_id="r", tenant="t", drafter="adaptive", k=3, drafted=3, accepted=2, emitted=3,
                  draft_tokens=[5, 6, 7], emitted_tokens=[5, 9, 7], confidence=[], weight_version=1)
    ok = StepEntry(step=1, request_id="r", tenant="t", drafter="adaptive", k=3, drafted=3, accepted=2, emitted=3,
                   draft_tokens=[5, 6, 7], emitted_tokens=[5, 6, 8], confidence=[], weight_version=1)
    assert ok.accepted == 2


def test_acceptance_window_follows_recent_traffic():
    st = ServedStats("adaptive", window=100)
    st.add("s", [_served_entry(1, 4, 4) for _ in range(100)])
    st.add("s", [_served_entry(1, 4, 0) for _ in range(100)])
    acc, n = st.acceptance(1)
    assert acc == 0.0 and 100 <= n < 104


# -- checkpoints, trainer, base ---------------------------------------------------------------------------------


def _batch(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = AdaptiveFeatures(torch.randn(n, 64, generator=g), torch.randint(3, VOCAB, (n,), generator=g))
    return feats, torch.randint(3, VOCAB, (n, W), generator=g)


def test_checkpoint_round_trip_restores_weights_and_optimizer_exactly(target, tmp_path):
    base_path = write_base(AdaptiveHead.for_target(target, inner_size=32), tmp_path / "base.safetensors")
    base = read_base(base_path)
    a = Trainer(base.build(lr=1e-2), W)
    for i in range(3):
        a.step(*_batch(seed=i))
    store = CheckpointStore(tmp_path / "state", "adaptive", base.fingerprint)
    moments, step = a.optimizer_state()
    path = store.save(TrainerState(a.weights(), moments, step, a.updates, a.trained_tokens, 0,
                                   [VersionRecord(1, "gate", 0, 1.0)]))
    assert json.loads((path / "manifest.json").read_text())["updates"] == 3
    st = store.latest()
    b = Trainer(base.build(lr=1e-2), W)
    b.load_weights(st.weights, reset_optimizer=False)
    b.load_optimizer_state(st.optimizer, st.optimizer_step)
    assert st.history[0].source == "gate" and st.updates == 3
    a.step(*_batch(seed=9))
    b.step(*_batch(seed=9))
    for (n, x), (_, y) in zip(a.head.state_dict().items(), b.head.state_dict().items()):
        assert torch.equal(x, y), n


def test_damaged_or_partial_checkpoints_are_skipped(target, tmp_path):
    base = read_base(write_base(AdaptiveHead.for_target(target, inner_size=32), tmp_path / "b.safetensors"))
    store = CheckpointStore(tmp_path / "state", "adaptive", base.fingerprint, keep_checkpoints=5)
    w = {k: v.clone() for k, v in base.init.items()}
    first = store.save(TrainerState(w, {}, 0, 1, 10, 0))
    second = store.save(TrainerState(w, {}, 0, 2, 20, 0))
    with open(second / "trainer.safetensors", "r+b") as f:  # bit rot
        f.seek(200)
        f.write(b"\xff\xff\xff")
    (tmp_path / "state" / "checkpoints" / ".tmp-123-00000009").mkdir()  # a write that was killed
    store = CheckpointStore(tmp_path / "state", "adaptive", base.fingerprint)
    assert store.latest().updates == 1 and store.latest().path == first
    assert not list((tmp_path / "state" / "checkpoints").glob(".tmp-*"))
    other = CheckpointStore(tmp_path / "state", "adaptive", "f" * 64)  # another base: nothing to resume
    assert other.latest() is None


def test_a_checkpoint_keeps_the_replay_buffers_and_every_manifest_byte_is_checked(target, tmp_path):
    """D23: a restart used to lose the replay buffer and the held-out split; D12: the manifest had no checksum
    (6.5% of random 1-byte flips loaded with silently altered counters). Now both buffers are in the
    checkpoint, and no 1-byte flip of the manifest or of a buffer byte loads."""
    base = read_base(write_base(AdaptiveHead.for_target(target, inner_size=32), tmp_path / "b.safetensors"))
    store = CheckpointStore(tmp_path / "state", "adaptive", base.fingerprint, keep_checkpoints=5)
    w = {k: v.clone() for k, v in base.init.items()}
    buf = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=64)
    buf.add(_samples("a", 100))
    held = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=64)
    held.add(_samples("b", 10, start=500))
    path = store.save(TrainerState(w, {}, 0, 7, 70, 0, buffers={"buffer": buf.state(), "holdout": held.state()}))
    state = store.load(path)
    assert state.updates == 7 and set(state.buffers) == {"buffer", "holdout"}
    back = ReplayBuffer(hidden_size=4, width=2, tenant_capacity=64)
    back.load_state(*state.buffers["buffer"])
    assert back.fill() == {"a": 64} and torch.equal(back.newest(64)[0].hidden, buf.newest(64)[0].hidden)
    raw = (path / "manifest.json").read_bytes()
    gen = torch.Generator().manual_seed(0)
    for pos in torch.randint(0, len(raw), (60,), generator=gen).tolist():
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=gen))
        (path / "manifest.json").write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            store.load(path)
    (path / "manifest.json").write_bytes(raw)
    data = bytearray((path / "buffers.safetensors").read_bytes())
    data[-3] ^= 0x10
    (path / "buffers.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="buffers"):
        store.load(path)


@pytest.mark.parametrize("manifest", ["[]", '{"files": []}', '"x"', '{"format": 1, "files": {"a": 5}}'])
def test_a_manifest_of_the_wrong_shape_is_skipped_with_a_warning(target, tmp_path, manifest, caplog):
    """D12/D13: valid JSON of the wrong shape used to crash the start (AttributeError); damaged checkpoints
    were skipped without a word. Now each is a CheckpointError, skipped with a warning naming it."""
    import logging

    base = read_base(write_base(AdaptiveHead.for_target(target, inner_size=32), tmp_path / "b.safetensors"))
    store = CheckpointStore(tmp_path / "state", "adaptive", base.fingerprint, keep_checkpoints=5)
    w = {k: v.clone() for k, v in base.init.items()}
    only = store.save(TrainerState(w, {}, 0, 1, 10, 0))
    (only / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError):
        store.load(only)
    with caplog.at_level(logging.WARNING, logger="adaspec.sidecar.checkpoint"):
        assert store.latest() is None
    assert "damaged" in caplog.text and "every checkpoint (1) is damaged" in caplog.text


def test_versions_are_checksummed_and_pruned(target, tmp_path):
    base = read_base(write_base(AdaptiveHead.for_target(target, inner_size=32), tmp_path / "b.safetensors"))
    store = CheckpointStore(tmp_path / "s", "adaptive", base.fingerprint, keep_versions=3)
    for v in range(1, 6):
        store.save_version(VersionRecord(v, "gate", v - 1, float(v)), {k: t + v for k, t in base.init.items()})
    store.prune_versions(protect={1})
    assert store.versions() == [1, 3, 4, 5]
    w, rec = store.load_version(4)
    assert rec.parent == 3 and torch.equal(w["up.weight"], base.init["up.weight"] + 4)
    raw = bytearray(store.version_path(5).read_bytes())
    raw[-5] ^= 0xFF
    store.version_path(5).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        store.load_version(5)
    with pytest.raises(CheckpointError, match="not stored"):
        store.load_version(2)


def test_base_round_trip_and_damage(target, tmp_path):
    head = AdaptiveHead.for_target(target, inner_size=32, seed=3)
    path = write_base(head, tmp_path / "base.safetensors")
    base = read_base(path)
    rebuilt = base.build()
    for k, v in head.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    assert torch.equal(rebuilt.lm_head_weight, head.lm_head_weight)
    raw = bytearray(path.read_bytes())
    for pos in (-100, len(raw) // 2):  # inside the initial weights, inside the frozen tensors
        damaged = bytearray(raw)
        damaged[pos] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(ConfigError, match="mismatch"):
            read_base(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read"):
        read_base(path)


def test_export_is_loadable_as_a_head(target, tmp_path):
    head = AdaptiveHead.for_target(target, inner_size=32, seed=5)
    torch.nn.init.normal_(head.down.weight)
    import dataclasses

    (tmp_path / "out").mkdir()
    path = export_head(tmp_path / "out", head.state_dict(), dataclasses.asdict(head.cfg), 7, "adaptive")
    assert path == tmp_path / "out" / "adaptive-v7.safetensors"
    assert export_head(tmp_path / "h.safetensors", head.state_dict(), {}, 7, "adaptive") == tmp_path / "h.safetensors"
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    assert set(loaded) == set(head.state_dict())
    from adaspec.core.heads.adaptive import load_adaptive

    again = load_adaptive(path, target)
    assert torch.equal(again.down.weight, head.down.weight)


def test_settings_are_validated_with_env_names(monkeypatch):
    monkeypatch.setenv("ADASPEC_SIDECAR_GATE_K", "0")
    with pytest.raises(ConfigError, match="ADASPEC_SIDECAR_GATE_K"):
        load_sidecar_settings()
    monkeypatch.delenv("ADASPEC_SIDECAR_GATE_K")
    with pytest.raises(ConfigError, match="gate_min_samples"):
        load_sidecar_settings(gate_min_samples=100, gate_max_samples=10)
    s = SidecarSettings(unroll=2, gate_k=5)
    assert s.target_width() == 5
    assert all(info.description for info in SidecarSettings.model_fields.values())
    assert os.environ.get("ADASPEC_SIDECAR_GATE_K") is None


def test_cpu_budget_holds_the_average_share():
    """The token bucket lets the process use `share` of a core on average: busy work drains it, waiting
    refills it at `share` per second, and it never banks more than two seconds' worth."""
    import time

    from adaspec.sidecar.budget import CpuBudget

    budget = CpuBudget(0.25)
    assert budget.available() and budget.tokens <= 0.5 + 1e-6
    t0, w0 = time.process_time(), time.monotonic()
    # spend 0.2 CPU-seconds more than the bucket held plus what it refilled meanwhile (a loaded machine
    # stretches the wall time, and so the refill: the debt is what counts)
    while time.process_time() - t0 < 0.5 + 0.25 * (time.monotonic() - w0) + 0.2:
        pass
    assert not budget.available()
    debt = -budget.tokens
    assert 0.15 < debt < 0.35
    time.sleep(debt / 0.25 + 0.4)  # +0.1 s of budget once the debt is repaid
    assert budget.available()
    assert budget.tokens <= 0.25 * 1.2
    time.sleep(2.5)
    assert budget.available() and budget.tokens <= 0.5 + 1e-6  # never banks more than two seconds' worth


def _served(drafter, emitted: int, accepted: int, prefill: bool = False) -> StepEntry:
    drafted = accepted if drafter else 0
    return StepEntry(step=1, request_id="r", tenant="t", drafter=drafter, k=drafted, drafted=drafted,
                     accepted=accepted, emitted=emitted, draft_tokens=[], emitted_tokens=[], confidence=[],
                     weight_version=0, prefill=prefill)


def test_earned_share_is_the_drafters_accepted_share_of_recent_emitted_tokens():
    """Only the trained drafter's accepted tokens count as earned, every drafter's (and plain) decode tokens
    as emitted, prefills as neither; the window keeps the newest emitted tokens."""
    from adaspec.sidecar.budget import EarnedShare

    e = EarnedShare("adaptive", window=100)
    assert e.fraction == 0.0
    e.add([_served(None, 1, 0)] * 10 + [_served("suffix", 4, 3)] * 5 + [_served("adaptive", 3, 2)] * 10)
    assert (e.earned, e.emitted) == (20, 60)
    e.add([_served("adaptive", 9, 8, prefill=True)])  # a prefill's tokens are not decode work
    assert (e.earned, e.emitted) == (20, 60)
    e.add([_served(None, 1, 0)] * 80)  # 140 emitted: the oldest entries leave, the newest 100 tokens stay
    assert 100 <= e.emitted < 100 + 3 and e.earned == 14
    e.add([_served(None, 1, 0)] * 100)
    assert e.fraction == 0.0


def test_a_colocated_learners_cores_follow_its_drafters_earnings():
    """Unearned: the floor (unearned_tax / tax per core); then half the earned share of serving time, converted
    by the tax per core, capped at cpu_share; never below the floor."""
    from adaspec.sidecar.budget import earned_cores

    assert earned_cores(0.0, 3.0, 0.01, 0.25) == pytest.approx(0.01 / 3.0)
    assert earned_cores(0.001, 3.0, 0.01, 0.25) == pytest.approx(0.01 / 3.0)
    assert earned_cores(0.3, 3.0, 0.01, 0.25) == pytest.approx(0.05)
    assert earned_cores(1.0, 1.0, 0.01, 0.25) == 0.25
    assert earned_cores(0.3, 3.0, 0.0, 0.25) > earned_cores(0.2, 3.0, 0.0, 0.25)


def test_low_priority_applies_and_spawned_colocated_sidecars_use_it(tmp_path):
    """'idle' scheduling is applied to the process (SCHED_IDLE on Linux); `spawn_sidecar(colocated=True)` asks
    for it and for a bounded CPU share, unless the user's environment says otherwise."""
    import subprocess
    import sys

    code = ("from adaspec.sidecar.service import set_priority; import os; print(set_priority('idle'), "
            "os.sched_getscheduler(0) == getattr(os, 'SCHED_IDLE', -1) or os.nice(0) == 19)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ("SCHED_IDLE", "nice") and out[-1] == "True"
    from adaspec.sidecar import process

    assert process.COLOCATED["priority"] == "idle" and 0 < process.COLOCATED["cpu_share"] < 1
    assert process.COLOCATED["share_follows_earnings"] is True
    s = SidecarSettings(priority="idle", cpu_share=0.5, state_dir=tmp_path)
    assert s.priority == "idle" and s.cpu_share == 0.5
    with pytest.raises(ValueError):
        SidecarSettings(priority="realtime", state_dir=tmp_path)


def test_hostile_seq_jumps_count_as_restarts_and_status_stays_encodable():
    """D1: batches with seq alternating 0 / 2^63-1 once summed to a lost-batch count past 64 bits, which made
    admin `status` unencodable; a jump beyond MAX_SEQ_GAP is a restart, and the counters stay small."""
    from adaspec.core.online.wire import encode
    from adaspec.sidecar.samples import MAX_SEQ_GAP

    asm = StreamAssembler(64, VOCAB, W)
    for seq in [0, 2**63 - 1] * 3 + [5, 7]:
        asm.add_batch(LogBatch(server_id="s", seq=seq, entries=[]))
    assert asm.gaps["s"] == 1 and asm.restarts["s"] >= 5  # only 5 -> 7 lost a batch
    asm.add_batch(LogBatch(server_id="s", seq=7 + MAX_SEQ_GAP + 1, entries=[]))
    assert asm.gaps["s"] == 1 + MAX_SEQ_GAP
    encode(AdminReply(ok=True, status={"logs_lost": int(sum(asm.gaps.values()))}))  # no OverflowError


def test_kept_prefill_rows_do_not_pin_the_whole_message():
    """D17: a prefill entry carries features for its whole prompt but pairs one row with its emitted token;
    the kept row is a copy, so the decoded message (here 4096 rows) can be freed."""
    asm = StreamAssembler(64, VOCAB, W)
    big = _decode_entry(4096, accepted=0, prefill=True, drafter=None, drafted=0, draft_tokens=[],
                        emitted_tokens=[7])
    asm.add_batch(LogBatch(server_id="s", seq=0, entries=[big]))
    rows = [r for st in asm.streams.values() for r in st.rows]
    assert rows and all(r.untyped_storage().nbytes() <= 64 * 4 * r.shape[0] for r in rows)


def test_an_unusable_state_dir_is_a_config_error(target, tmp_path):
    """D14: `versions` that is a file or a dangling symlink (and a read-only dir) used to end in a traceback;
    it is a ConfigError, which the CLI prints as one `error:` line (exit code 2)."""
    base = read_base(write_base(AdaptiveHead.for_target(target, inner_size=32), tmp_path / "b.safetensors"))
    for kind in ("file", "dangling"):
        state = tmp_path / f"state-{kind}"
        state.mkdir()
        if kind == "file":
            (state / "versions").write_text("not a dir")
        else:
            (state / "versions").symlink_to(tmp_path / "nowhere")
        with pytest.raises(ConfigError, match="unusable"):
            CheckpointStore(state, "adaptive", base.fingerprint)


def test_the_base_carries_the_servers_draft_vocabulary_so_the_gate_scores_what_they_draft(target, tmp_path):
    """A server's adaptive head drafts over the static head's draft ids; the sidecar rebuilds its heads from the
    base, so the base must carry them: otherwise the gate credits a candidate with tokens it never drafts."""
    head = AdaptiveHead.for_target(target, inner_size=32, seed=1)
    full = read_base(write_base(head, tmp_path / "full.safetensors"))
    ids = torch.arange(3, 40)
    head.set_draft_vocab(ids)
    base = read_base(write_base(head, tmp_path / "draft.safetensors"))
    assert full.draft_ids is None and full.build().draft_ids is None
    assert torch.equal(base.draft_ids, ids) and torch.equal(base.build(lr=1e-2).draft_ids, ids)
    assert base.fingerprint != full.fingerprint  # a checkpoint trained over one vocabulary is not resumed on the other
    # The same held-out samples, scored as served: a restricted head never matches a target outside its ids.
    feats, targets = _batch(seed=4)
    restricted, unrestricted = base.build(), full.build()
    ids_drafted = dispatch.draft_topk(restricted.step(feats.hidden, feats.tokens), restricted.draft_lm_head, 1)[0][:, 0]
    assert bool((restricted.draft_ids[ids_drafted] < 40).all())
    outside = targets.clone()
    outside[:, 0] = unrestricted.step(feats.hidden, feats.tokens).float().matmul(
        unrestricted.lm_head_weight.float().T).argmax(-1)  # what the full-vocabulary head drafts first
    drafts_outside = outside[:, 0] >= 40
    assert bool(drafts_outside.any())
    acc_full = replay_accepted(unrestricted, feats, outside, 1)
    acc_served = replay_accepted(restricted, feats, outside, 1)
    assert bool((acc_full[drafts_outside] == 1).all()) and bool((acc_served[drafts_outside] == 0).all())


def test_a_base_with_a_bad_draft_vocabulary_is_refused(target, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    head = AdaptiveHead.for_target(target, inner_size=32, seed=1)
    head.set_draft_vocab(torch.arange(3, 40))
    path = write_base(head, tmp_path / "b.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["frozen.draft_ids"] = torch.tensor([5, 5, 10**9])
    save_file(tensors, str(path), meta)
    with pytest.raises(ConfigError, match="draft vocabulary"):
        read_base(path)
