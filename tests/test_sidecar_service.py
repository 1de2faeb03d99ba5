"""The sidecar service in-process on real IPC sockets with a tiny target: learning loop, admin, rollback, resume."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry

from adaspec.core.step import FixedPolicy
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.heads.adaptive import AdaptiveHead
from adaspec.core.online.attach import OnlineAdaptive
from adaspec.core.online.transport import Transport
from adaspec.core.online.wire import AdminRequest, LogBatch, StepEntry, encode
from adaspec.core.heads.adaptive_base import write_base
from adaspec.sidecar.service import SidecarService
from adaspec.sidecar.settings import SidecarSettings
from sidecar_helpers import (
    chaotic_target, cleanup, engine_with_adaptive, short_dir, stream, templates, transport_settings,
)

PARAMS = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def target():
    return chaotic_target()


@pytest.fixture
def root():
    path = short_dir()
    yield path
    cleanup(path)


def _settings(root, **kw) -> SidecarSettings:
    base = dict(state_dir=root / "state", base_path=root / "base.safetensors", lr=3e-3, batch_size=32,
                min_samples=16, gate_every=4, gate_min_samples=16, holdout_fraction=0.25, poll_ms=10,
                checkpoint_every=10, rollback_min_drafted=40)
    base.update(kw)
    return SidecarSettings(**base)


class Running:
    """A service running its loop in a thread (stop() joins it)."""

    def __init__(self, svc: SidecarService) -> None:
        self.svc = svc
        self.thread = threading.Thread(target=svc.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.svc.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.svc.close()


def _acceptance(results) -> float:
    recs = [x for r in results for x in r.records if x.drafted]
    return sum(x.accepted for x in recs) / max(1, sum(x.drafted for x in recs))


def _wait(cond, timeout=30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_online_loop_versions_rise_swaps_between_steps_outputs_stay_greedy(target, root):
    engine, drafter = engine_with_adaptive(target, inner_size=256)
    write_base(drafter.head, root / "base.safetensors")
    ts = transport_settings(root)
    running = Running(SidecarService(_settings(root, rollback_min_drafted=256), ts))
    tmpls = templates()
    probe = stream(tmpls, 8, seed=99)  # held-out requests, measured before and after, never logged
    plain = engine.generate(probe, PARAMS, FixedPolicy("none", 0))
    before = _acceptance(engine.generate(probe, PARAMS, FixedPolicy("adaptive", 3)))
    registry = CollectorRegistry()
    online = OnlineAdaptive(engine, drafter, ts, registry=registry).start()
    at_start: dict[int, int] = {}
    at_end: dict[int, int] = {}
    engine.between_steps.append(lambda: at_start.__setitem__(engine.step_count + 1, online.version))
    engine.step_listeners.append(lambda recs: at_end.__setitem__(engine.step_count, online.version))
    try:
        assert online.wait_synced(10)
        for wave in range(8):  # every wave: how far it learns must not depend on how fast versions come
            engine.generate(stream(tmpls, 8, seed=wave), PARAMS, FixedPolicy("adaptive", 3))
            _wait(lambda: running.svc.trainer.updates >= 4 * (wave + 1), timeout=10)
        running.svc.stop()  # no more versions: the probe measures one
        running.thread.join(30)
        assert _wait(lambda: online.stager.newest_version() == running.svc.serving_version)
        after_res = engine.generate(probe, PARAMS, FixedPolicy("adaptive", 3))
        after = _acceptance(after_res)
        assert [r.output_tokens for r in after_res] == [r.output_tokens for r in plain]  # lossless
        assert online.version >= 2 and online.versions_applied() == sorted(online.versions_applied())
        assert before < 0.2 and after > before + 0.3, (before, after)
        # every step drafted with one version: the one in place when it started is the one it reports
        assert at_start and all(at_start[s] == at_end[s] for s in at_end if s in at_start)
        assert {v for _, v, _ in online.swaps} <= set(at_start.values())
        assert all(p > 0 for _, _, p in online.swaps)
        st = running.svc.status()
        assert st["version"] == online.version and st["gate_publish"] >= online.version
        assert st["server_versions"]["server-0"] <= online.version
        assert online.logs_dropped() == {"batches": 0, "entries": 0}
        assert registry.get_sample_value("adaspec_engine_forwards_total", {"drafter": "adaptive"}) > 0
        assert registry.get_sample_value("adaspec_engine_swap_pause_seconds_count", {"drafter": "adaptive"}) == len(
            online.swaps)
    finally:
        online.close()
        running.stop()


def _svc(root, target, **kw) -> SidecarService:
    if not (root / "base.safetensors").exists():
        write_base(AdaptiveHead.for_target(target, inner_size=64, seed=0), root / "base.safetensors")
    return SidecarService(_settings(root, **kw), transport_settings(root))


def test_admin_commands(target, root):
    svc = _svc(root, target)
    threading_svc = Running(svc)
    try:
        with Transport(transport_settings(root)) as t:
            admin = t.admin_client()
            st = admin.call("status").status
            assert st["version"] == 0 and st["paused"] is False and st["versions"] == []
            assert admin.call("pause").ok and _wait(lambda: svc.paused)
            assert admin.call("status").status["paused"] is True
            assert admin.call("resume").ok and not svc.paused
            ckpt = admin.call("snapshot").status["checkpoint"]
            assert ckpt.endswith("ckpt-00000001")
            bad = admin.call("rollback", version=5)
            assert not bad.ok and "never published" in bad.error
            assert not admin.call("rollback", version="x").ok
            assert not admin.call("rollback").ok
            r = admin.call("rollback", version=0, reason="test")
            assert r.ok and r.status == {"version": 1, "weights_of": 0}
            r = admin.call("reset")
            assert r.ok and r.status["version"] == 2
            out = root / "exported.safetensors"
            r = admin.call("export", path=str(out))
            assert r.ok and out.is_file() and r.status["version"] == 2
            assert not admin.call("export").ok
            # D16: no overwriting, no relative paths, nothing inside the state dir, no new directories
            for bad_path, why in ((out, "exists"), ("exported.safetensors", "absolute"),
                                  (root / "state" / "base.safetensors", "state dir"),
                                  (root / "new-dir" / "x.safetensors", "does not exist")):
                r = admin.call("export", path=str(bad_path))
                assert not r.ok and why in r.error, (bad_path, r.error)
            assert not admin.call("frobnicate").ok
            st = admin.call("status").status
            assert st["versions"] == [1, 2] and st["versions_source"] == ["operator-rollback", "reset"]
            assert st["rollbacks"] == 1 and "test" in st["last_rollback"]
            admin.close()
    finally:
        threading_svc.stop()


def _entries(version: int, n: int, drafted: int, accepted: int) -> list[StepEntry]:
    return [StepEntry(step=i, request_id=f"r{version}-{i}", tenant="t", drafter="adaptive", k=drafted,
                      drafted=drafted, accepted=accepted, emitted=accepted + 1, draft_tokens=[], emitted_tokens=[],
                      confidence=[], weight_version=version) for i in range(n)]


def test_automatic_rollback_republishes_the_previous_weights(target, root):
    svc = _svc(root, target, rollback_min_drafted=200, rollback_margin=0.1)
    engine, drafter = engine_with_adaptive(target, inner_size=64)
    online = OnlineAdaptive(engine, drafter, transport_settings(root), registry=CollectorRegistry()).start()
    try:
        v0 = svc.weights_of(0)
        w1 = {k: v + 0.01 for k, v in v0.items()}
        assert svc.publish(w1, "gate", "test") == 1
        assert _wait(lambda: (svc.run_once(), online.stager.staged_version == 1)[1], 10)
        pusher = svc.transport.log_pusher()
        pusher.send(_encode(LogBatch(server_id="x", seq=0, entries=_entries(0, 100, 4, 2))))  # v0: 0.5
        pusher.send(_encode(LogBatch(server_id="x", seq=1, entries=_entries(1, 30, 4, 2))))  # v1 fine so far
        for _ in range(20):
            svc.run_once()
        assert svc.serving_version == 1 and not svc.rollbacks
        pusher.send(_encode(LogBatch(server_id="x", seq=2, entries=_entries(1, 70, 4, 0))))  # v1 collapses
        assert _wait(lambda: (svc.run_once(), bool(svc.rollbacks))[1], 10)
        assert svc.serving_version == 2 and svc.serving_record.source == "rollback"
        assert svc.rollbacks[-1]["from"] == 1 and svc.rollbacks[-1]["weights_of"] == 0
        for k, v in svc.trainer.weights().items():
            assert torch.equal(v, v0[k])  # the trainer restarts from the good weights
        assert _wait(lambda: (svc.run_once(), online.stager.staged_version == 2)[1], 10)
        engine.between_steps[0]()  # what the engine runs between steps
        assert online.version == 2
        for k, v in drafter.head.state_dict().items():
            assert torch.equal(v, v0[k])
        assert svc.status()["rollbacks"] == 1
        pusher.close()
    finally:
        online.close()
        svc.close()


def _encode(msg):
    from adaspec.core.online.wire import encode

    return encode(msg)


def test_restart_resumes_checkpoint_and_version(target, root):
    engine, drafter = engine_with_adaptive(target, inner_size=128)
    write_base(drafter.head, root / "base.safetensors")
    ts = transport_settings(root)
    svc = SidecarService(_settings(root), ts)
    running = Running(svc)
    registry = CollectorRegistry()
    online = OnlineAdaptive(engine, drafter, ts, registry=registry).start()
    tmpls = templates()
    try:
        for wave in range(6):
            engine.generate(stream(tmpls, 8, seed=wave), PARAMS, FixedPolicy("adaptive", 3))
            if _wait(lambda: svc.serving_version >= 2, timeout=3):
                break
        assert svc.serving_version >= 2
    finally:
        svc.stop()
        running.thread.join(30)
    # a crash right after a publish: whatever serves is durable (version file + checkpoint on publish)
    served, weights = svc.serving_version, svc._serving_weights()
    svc.close()
    assert _wait(lambda: online.version == served or online.stager.staged_version == served, 10)
    engine.between_steps[0]()

    def stale() -> float:
        return registry.get_sample_value("adaspec_weight_updates_rejected_total",
                                         {"drafter": "adaptive", "reason": "stale"}) or 0.0

    rejected_before = stale()

    again = SidecarService(_settings(root), ts)
    running = Running(again)
    try:
        assert again.serving_version == served
        for k, v in again._serving_weights().items():
            assert torch.equal(v, weights[k])
        ckpt = again.store.latest()
        for k, v in again.trainer.weights().items():
            assert torch.equal(v, ckpt.weights[k])
        # a server that restarts from scratch gets exactly that version from the sync path
        engine2, drafter2 = engine_with_adaptive(target, inner_size=128)
        fresh = OnlineAdaptive(engine2, drafter2, ts, server_id="server-1", registry=CollectorRegistry()).start()
        try:
            assert _wait(lambda: fresh.stager.staged_version == served, 10)
            engine2.between_steps[0]()
            for k, v in drafter2.head.state_dict().items():
                assert torch.equal(v, weights[k])
        finally:
            fresh.close()
        # the server that already holds it is not sent it again (no stale rejection)
        time.sleep(1.5)  # > resync_s: it has re-synced at least once
        assert online.version == served
        assert stale() == rejected_before
    finally:
        online.close()
        running.stop()


def test_pause_stops_training_but_not_ingest(target, root):
    engine, drafter = engine_with_adaptive(target, inner_size=64)
    write_base(drafter.head, root / "base.safetensors")
    ts = transport_settings(root)
    svc = SidecarService(_settings(root), ts)
    svc.paused = True
    online = OnlineAdaptive(engine, drafter, ts, registry=CollectorRegistry()).start()
    try:
        engine.generate(stream(templates(), 8), PARAMS, FixedPolicy("adaptive", 3))
        online.flush_logs()
        for _ in range(50):
            svc.run_once()
        assert len(svc.buffer) > 50 and svc.trainer.updates == 0 and svc.serving_version == 0
        svc.paused = False
        for _ in range(50):
            svc.run_once()
        assert svc.trainer.updates > 0
    finally:
        online.close()
        svc.close()


def test_a_colocated_learner_trains_only_as_its_drafter_earns(target, root):
    """A co-located sidecar process (`spawn_sidecar(colocated=True)`): logs of plain decoding (its drafter
    earns nothing) leave it at its floor share -- after its first update the bucket stays empty -- while logs in
    which the drafter's drafts are accepted raise its share, and it trains. Its status shows both numbers."""
    from adaspec.sidecar.process import spawn_sidecar

    engine, drafter = engine_with_adaptive(target, inner_size=64)
    ts = transport_settings(root)
    knobs = dict(lr=3e-3, batch_size=32, min_samples=16, gate_every=1000, holdout_fraction=0.25, poll_ms=10,
                 serving_tax_per_core=1.0, unearned_tax=1e-5, cpu_share=1.0)
    with spawn_sidecar(ts, root / "state", head=drafter.head, settings=knobs, env={"OMP_NUM_THREADS": "1"},
                       colocated=True, ready_timeout_s=60) as sidecar:
        online = OnlineAdaptive(engine, drafter, ts, registry=CollectorRegistry()).start()
        try:
            engine.generate(stream(templates(), 8), PARAMS, FixedPolicy("none", 0))
            online.flush_logs()
            assert _wait(lambda: sidecar.status()["buffer_samples"] > 50, timeout=10)
            time.sleep(1.0)
            st = sidecar.status()
            assert st["earned_fraction"] == 0.0 and st["cpu_share"] == pytest.approx(1e-5)
            assert st["updates"] <= 1
            # then the servers report steps in which the drafter's drafts supply most tokens (no features:
            # the samples already buffered are what it trains on)
            earning = [StepEntry(step=i, request_id=f"e{i}", tenant="t", drafter="adaptive", k=3, drafted=3,
                                 accepted=3, emitted=4, draft_tokens=[], emitted_tokens=[], confidence=[],
                                 weight_version=0) for i in range(64)]
            with Transport(ts) as t:
                pusher = t.log_pusher()
                assert pusher.send(encode(LogBatch(server_id="earner", seq=0, entries=earning)))
                ok = _wait(lambda: sidecar.status()["updates"] >= st["updates"] + 3, timeout=20)
                pusher.close()
            assert ok, sidecar.status()["cpu_share"]
            st = sidecar.status()
            assert st["earned_fraction"] > 0.0
            assert st["cpu_share"] == pytest.approx(st["earned_fraction"] / 2, rel=0.01, abs=1e-4)
        finally:
            online.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoints(target, root):
    port, engine_port = _free_port(), _free_port()
    svc = _svc(root, target, metrics_port=port)
    engine, drafter = engine_with_adaptive(target, inner_size=64)
    online = OnlineAdaptive(engine, drafter, transport_settings(root), registry=CollectorRegistry(),
                            metrics_port=engine_port).start()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "adaspec_sidecar_published_version 0.0" in body
        assert "adaspec_sidecar_buffer_fill_ratio" in body
        engine.generate([[1, 5, 6]], SamplingParams(max_new_tokens=8), FixedPolicy("adaptive", 2))
        body = urllib.request.urlopen(f"http://127.0.0.1:{engine_port}/metrics", timeout=5).read().decode()
        assert 'adaspec_engine_forwards_total{drafter="adaptive"}' in body
        assert 'adaspec_log_entries_sent_total{server="server-0"}' in body
        assert 'adaspec_drafter_weights_version{drafter="adaptive"} 0.0' in body
    finally:
        online.close()
        svc.close()


def test_one_sidecar_per_state_dir_and_a_failing_turn_does_not_stop_the_loop(target, root):
    from adaspec.core.errors import ConfigError

    svc = _svc(root, target)
    try:
        with pytest.raises(ConfigError, match="another sidecar"):
            SidecarService(_settings(root), transport_settings(root))
        calls = []

        def broken() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise OSError("disk full")
            svc.stop()

        svc.run_once = broken  # type: ignore[method-assign]
        svc.run()  # returns after the second turn: the first one's error was logged and counted
        assert len(calls) == 2
        assert svc.registry.get_sample_value("adaspec_sidecar_loop_errors_total") == 1.0
    finally:
        svc.close()
    again = _svc(root, target)  # the lock went with the first one
    again.close()


def test_resume_skips_a_damaged_version_file_and_never_reuses_its_number(target, root):
    svc = _svc(root, target)
    w = svc.weights_of(0)
    svc.publish({k: v + 1 for k, v in w.items()}, "gate")
    svc.publish({k: v + 2 for k, v in w.items()}, "gate")
    svc.close()
    path = svc.store.version_path(2)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    again = _svc(root, target)
    try:
        assert again.serving_version == 1
        for k, v in again._serving_weights().items():
            assert torch.equal(v, w[k] + 1)
        assert again.publish(w, "gate") == 3
    finally:
        again.close()


def test_a_second_sidecar_on_the_same_run_dir_refuses_instead_of_stealing_endpoints(target, root):
    """D9: binding an IPC path replaces the socket file, so a second sidecar on the same run dir used to take
    every endpoint silently; now it refuses with a clear error and the first keeps serving."""
    from adaspec.core.errors import ConfigError

    first = _svc(root, target)
    try:
        other = dict(state_dir=root / "state2")
        with pytest.raises(ConfigError, match="serves the IPC endpoints"):
            SidecarService(_settings(root, **other), transport_settings(root))
        reply = first.handle_admin(AdminRequest(command="status"))
        assert reply.ok
    finally:
        first.close()
    second = SidecarService(_settings(root, state_dir=root / "state2"), transport_settings(root))
    second.close()  # once the first is gone, the run dir is free


def test_per_server_state_and_metric_series_stay_bounded(target, root):
    """D7: a peer inventing server ids (1e5 of them once cost +405 MB and a 232 MB /metrics) now moves an LRU
    of `max_servers`: the least recently heard server's state and series go."""
    from prometheus_client import generate_latest

    svc = _svc(root, target, max_servers=8)
    try:
        for i in range(200):
            svc.ingest(LogBatch(server_id=f"spoof-{i:03d}-" + "x" * 400, seq=i % 3, entries=[]))
        svc.ingest(LogBatch(server_id="real", seq=0, entries=[]))
        assert len(svc.assembler.last_seq) <= 8 and len(svc.served.servers) <= 8
        text = generate_latest(svc.registry).decode()
        assert text.count("adaspec_sidecar_log_batches_received_total{") <= 8
        assert 'server="real"' in text and "spoof-000-" not in text
    finally:
        svc.close()


def test_a_failed_final_checkpoint_is_not_a_clean_exit(target, root):
    """D15: SIGTERM with a full or read-only disk used to log "final checkpoint failed" and exit 0; the service
    now says so (the CLI turns it into exit code 1 with an `error:` line)."""
    svc = _svc(root, target)
    try:
        svc.trainer.updates += 1  # something learned since the last checkpoint

        def full_disk():
            raise OSError(28, "No space left on device")

        svc.checkpoint = full_disk
        svc.stop()
        svc.run()  # stops at once; the final checkpoint fails
        assert svc.final_checkpoint_failed
    finally:
        svc.close()


def test_version_numbers_are_never_reused_when_versions_dir_is_lost(target, root):
    """D8: with `versions/` lost, the next publish used to be v1 again while servers held v12 (and rejected
    v1..v12 as stale); the checkpoint remembers what was published, so numbering goes on."""
    import shutil

    svc = _svc(root, target)
    try:
        w = svc._serving_weights()
        assert [svc.publish(w, "test"), svc.publish(w, "test")] == [1, 2]
    finally:
        svc.close()
    shutil.rmtree(root / "state" / "versions")
    again = _svc(root, target)
    try:
        assert again.publish(again._serving_weights(), "test") == 3
    finally:
        again.close()


def test_logs_are_encoded_and_sent_off_the_serving_thread(target, root):
    """The step only queues its records: a publisher that takes 100 ms per call runs on the sender thread (not
    the engine's), adds to the serving time nothing like 100 ms per step over the same run without it (measured
    first, so a slow machine does not make the bound), ships every step once drained, and releases each record's
    hidden states after encoding them."""
    engine, drafter = engine_with_adaptive(target, inner_size=64)
    online = OnlineAdaptive(engine, drafter, transport_settings(root), registry=CollectorRegistry())
    publish = online.publisher.__call__
    threads: set[str] = set()
    seen: list[bool] = []
    DELAY_S = 0.1

    def timed_run() -> float:
        t0 = time.perf_counter()
        engine.generate(stream(templates(), 4), PARAMS, FixedPolicy("adaptive", 3))
        return time.perf_counter() - t0

    unlogged_s = min(timed_run() for _ in range(2))  # the same run, not logged (the first one warms up)

    def slow_publish(records):
        threads.add(threading.current_thread().name)
        seen.append(all(r.features is not None for r in records))
        time.sleep(DELAY_S)
        publish(records)

    online.publisher = type("Slow", (), {"__call__": staticmethod(slow_publish), "flush": online.publisher.flush,
                                         "close": online.publisher.close,
                                         "metrics": online.publisher.metrics})()
    online.start()
    steps: list[int] = []
    engine.step_listeners.append(lambda recs: steps.append(len(recs)))
    try:
        t0 = time.perf_counter()
        res = engine.generate(stream(templates(), 4), PARAMS, FixedPolicy("adaptive", 3))
        serving_s = time.perf_counter() - t0
        assert online.flush_logs(timeout=30)
        assert threading.current_thread().name not in threads and len(threads) == 1
        assert len(seen) == len(steps) >= 10 and all(seen), "every step, features intact when encoded"
        # synchronous publishing would add >= DELAY_S per step
        assert serving_s < unlogged_s + 0.5 * DELAY_S * len(steps), (serving_s, unlogged_s, len(steps))
        assert all(rec.features is None for r in res for rec in r.records)
        assert online.logs_dropped() == {"batches": 0, "entries": 0}
    finally:
        online.close()
