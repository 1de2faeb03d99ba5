"""End to end on the real model: the reference engine and a sidecar *process* over real IPC sockets.

One code_edit stream of 8 requests x 32 tokens (the shortest prompts of the first 40) is served twice -- first by plain greedy decoding (the
reference outputs; its logs are what the sidecar first learns from), then again by the adaptive drafter
(the same requests recurring), online. Mid-stream the sidecar is killed with SIGKILL; serving goes on
untouched. A restarted sidecar resumes from its checkpoint and the engine ends on the version it serves.
Checked: versions rise, swaps happen only between steps, the adaptive drafter's acceptance rises over its
initial weights on the same requests, every output equals plain greedy, no request fails, hostile bytes
sent to the process are refused and counted.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import zmq
from prometheus_client import CollectorRegistry

from adaspec.core.config import load_settings
from adaspec.core.datasets import load_prompts, shared_data_dir
from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.engine.engine import FixedPolicy, SpecEngine
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.heads.adaptive import IGNORE, AdaptiveFeatures, AdaptiveHead
from adaspec.core.online import OnlineAdaptive, spawn_sidecar
from adaspec.core.target import load_target
from adaspec.core.wire import LogBatch
from adaspec.sidecar.gate import replay_accepted
from adaspec.sidecar.samples import StreamAssembler
from sidecar_helpers import capture_entries, cleanup, short_dir, transport_settings

pytestmark = pytest.mark.model

N_REQUESTS, MAX_NEW, K = 8, 32, 3
SIDECAR = dict(batch_size=32, unroll=2, gate_every=4, gate_k=K, gate_max_samples=128, gate_min_samples=24,
               holdout_fraction=0.25, lr=3e-3, min_samples=32, checkpoint_every=20, threads=1)


@pytest.fixture(scope="module")
def target():
    return load_target(load_settings(device="cpu"))


def _acceptance(records) -> tuple[float, int]:
    recs = [r for r in records if r.drafted]
    drafted = sum(r.drafted for r in recs)
    return sum(r.accepted for r in recs) / max(1, drafted), drafted


def _replay_acceptance(head: AdaptiveHead, entries, width: int = K) -> float:
    """Acceptance a k-chain of `head` gets from every root of the logged greedy streams (exact for greedy)."""
    asm = StreamAssembler(head.cfg.hidden_size, head.cfg.vocab_size, width)
    groups = asm.add_batch(LogBatch(server_id="ref", seq=0, entries=entries)) + asm.flush_all()
    hidden = torch.cat([g.hidden for g in groups])
    tokens = torch.cat([g.tokens for g in groups])
    targets = torch.cat([g.targets for g in groups])
    full = (targets != IGNORE).all(1)
    acc = replay_accepted(head, AdaptiveFeatures(hidden[full], tokens[full]), targets[full], K)
    return float(acc.sum()) / (K * int(full.sum()))


def test_engine_and_sidecar_processes_learn_swap_survive_kill_and_restart(target):
    rows = load_prompts(shared_data_dir() / "code_edit.jsonl", limit=5 * N_REQUESTS)
    prompts = sorted((target.encode(r.prompt) for r in rows), key=len)[:N_REQUESTS]  # short: prefill is costly
    params = SamplingParams(max_new_tokens=MAX_NEW)
    head = AdaptiveHead.for_target(target, inner_size=1024, seed=0)
    initial = AdaptiveHead.for_target(target, inner_size=1024, seed=0)  # a copy of version 0, for comparison
    drafter = AdaptiveDrafter(head)
    engine = SpecEngine(target, [drafter], batch_size=N_REQUESTS)  # one batch: CPU forwards are weight-bound
    root = short_dir()
    ts = transport_settings(root)
    sidecar = spawn_sidecar(ts, root / "state", head=head, settings=SIDECAR, env={"OMP_NUM_THREADS": "1"},
                            ready_timeout_s=120)
    registry = CollectorRegistry()
    online = OnlineAdaptive(engine, drafter, ts, registry=registry).start()
    try:
        assert online.wait_synced(30)
        # -- pass 1: plain greedy; the sidecar learns from its logs ---------------------------------------------
        t0 = time.perf_counter()
        entries = capture_entries(engine)
        reference = engine.generate(prompts, params, FixedPolicy("none", 0))
        engine.step_listeners.pop(0)  # stop capturing
        assert all(r.finish_reason in ("length", "stop") for r in reference)

        # -- pass 2: the same requests with the adaptive drafter, online; kill -9 the sidecar mid-stream ---------
        version_at: dict[int, int] = {}
        engine.between_steps.append(lambda: version_at.__setitem__(engine.step_count + 1, online.version))
        ended_with: dict[int, int] = {}
        first_step = engine.step_count + 1
        killed = {}

        def kill_midway(records) -> None:
            ended_with[engine.step_count] = online.version
            if not killed and engine.step_count - first_step >= 10:
                os.kill(sidecar.pid, signal.SIGKILL)
                killed["at"] = engine.step_count

        engine.step_listeners.append(kill_midway)
        t1 = time.perf_counter()
        online_results = engine.generate(prompts, params, FixedPolicy("adaptive", K))
        t2 = time.perf_counter()
        assert killed, "the stream ended before the kill"
        sidecar.proc.wait(10)
        assert sidecar.proc.returncode == -signal.SIGKILL

        # 0 failed requests, identical outputs (before and after the kill)
        assert [r.output_tokens for r in online_results] == [r.output_tokens for r in reference]
        assert all(r.finish_reason in ("length", "stop") for r in online_results)
        # versions rose and were applied between steps only: each step reports the version it started with
        applied = online.versions_applied()
        assert applied and applied == sorted(applied) and online.version >= 1
        assert all(version_at[s] == v for s, v in ended_with.items() if s in version_at)
        # the adaptive drafter accepts more than its initial weights on the same requests
        records = [x for r in online_results for x in r.records]
        live_acc, drafted = _acceptance(records)
        v0_acc = _replay_acceptance(initial, entries)
        final_acc = _replay_acceptance(head, entries)
        print(f"\nacceptance: v0 {v0_acc:.3f} (replayed), live {live_acc:.3f} over {drafted} drafted tokens, "
              f"final v{online.version} {final_acc:.3f} (replayed); swaps {online.swaps}")
        assert final_acc > v0_acc + 0.05 and live_acc > v0_acc + 0.05

        # -- restart: resumes from its checkpoint; the engine converges on the version it serves ------------------
        held = online.stager.newest_version()
        sidecar = sidecar.restart(ready_timeout_s=120)
        print(f"plain pass {t1 - t0:.1f} s, online pass {t2 - t1:.1f} s, restart {time.perf_counter() - t2:.1f} s")
        status = sidecar.status()
        assert status["version"] >= held  # every version the engine holds was durable: no number is reused
        assert status["updates"] > 0 and "ckpt-" in status["checkpoint"]
        deadline = time.monotonic() + 30
        while online.stager.newest_version() != sidecar.status()["version"] and time.monotonic() < deadline:
            time.sleep(0.2)
        serving = sidecar.status()["version"]
        assert online.stager.newest_version() == serving
        online._between()  # what the next engine step does first
        assert online.version == serving and online.subscriber.sync_failures > 0  # it noticed the outage

        # -- hostile bytes into the live process: refused, counted, still serving --------------------------------
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(ts.endpoint("logs"))
        before = sidecar.status()["logs_rejected"]
        for payload in (b"", b"\x00garbage", b"\x81\xa4kind\xa9log_batch", os.urandom(1000)):
            push.send(payload)
        deadline = time.monotonic() + 30
        while sidecar.status()["logs_rejected"] < before + 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        push.close(0)
        ctx.term()
        assert sidecar.alive() and sidecar.status()["logs_rejected"] == before + 4
    finally:
        online.close()
        sidecar.stop()
        cleanup(root)
