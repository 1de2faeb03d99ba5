"""Soak: a real `adaspec sidecar serve` process for 60 s under three log senders, an admin client and a weight-
sync client, with a hostile client mixed in on every socket (garbage, schema-breaking batches, oversize frames,
multi-frame requests).

Checked: every valid admin and sync request is answered throughout (none times out); the sidecar's RSS is
bounded (its growth over the second half of the run stays under a few MB once the buffer has filled); the
counts add up -- every entry a valid sender sent is received, every hostile log message is refused and
counted, every oversize frame shows as a dropped connection, and the sidecar trained and published meanwhile.
"""

from __future__ import annotations

import os
import random
import threading
import time

import msgpack
import torch
import zmq

from adaspec.core.heads.adaptive import AdaptiveConfig, AdaptiveHead
from adaspec.core.online.settings import TransportSettings
from adaspec.core.online.transport import Transport, TransportTimeout
from adaspec.core.online.wire import SCHEMA_VERSION, LogBatch, StepEntry, encode, tensor_to_blob
from adaspec.sidecar.process import spawn_sidecar
from sidecar_helpers import cleanup, short_dir

SOAK_S = float(os.environ.get("ADASPEC_SOAK_S", 60))
HIDDEN, VOCAB = 16, 64
SENDERS, BATCH_ENTRIES, SEND_EVERY_S = 3, 8, 0.02
MAX_MESSAGE = 256 * 1024
SIDECAR = dict(tenant_capacity=1024, max_tenants=4, holdout_capacity=256, holdout_fraction=0.25, min_samples=32,
               batch_size=32, gate_every=8, gate_min_samples=16, checkpoint_every=40, threads=1, poll_ms=5)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def _entry(rng: random.Random, request: str, step: int, tokens: list[int]) -> StepEntry:
    """A decode step that accepted 1 of 2 drafts; the request's tokens follow a short cycle (learnable)."""
    emitted = [tokens[step % len(tokens)], tokens[(step + 1) % len(tokens)]]
    draft = [emitted[0], (emitted[1] + 1) % VOCAB]
    return StepEntry(step=step, request_id=request, tenant=f"t{rng.randrange(2)}", drafter="adaptive", k=2,
                     drafted=2, accepted=1, emitted=2, draft_tokens=draft, emitted_tokens=emitted,
                     confidence=[0.6, 0.4], weight_version=0, features=tensor_to_blob(torch.randn(2, HIDDEN)))


class Sender(threading.Thread):
    """One server's log traffic: batches of consecutive steps of a few requests, never blocking."""

    def __init__(self, transport: Transport, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.transport, self.index, self.stop = transport, index, stop
        self.entries_sent = self.batches_sent = self.dropped = 0

    def run(self) -> None:
        rng = random.Random(self.index)
        pusher = self.transport.log_pusher()
        seq, step = 0, 0
        cycles = {f"s{self.index}-r{j}": [rng.randrange(VOCAB) for _ in range(5)] for j in range(4)}
        try:
            while not self.stop.is_set():
                entries = [_entry(rng, rid, step + i, toks) for rid, toks in cycles.items()
                           for i in range(BATCH_ENTRIES // len(cycles))]
                step += BATCH_ENTRIES // len(cycles)
                data = encode(LogBatch(server_id=f"server-{self.index}", seq=seq, entries=entries),
                              self.transport.limits)
                seq += 1
                if pusher.send(data):
                    self.entries_sent += len(entries)
                    self.batches_sent += 1
                else:
                    self.dropped += 1
                time.sleep(SEND_EVERY_S)
        finally:
            pusher.close()


class Asker(threading.Thread):
    """A client that must always be answered: admin `status` or a weight sync, every ~50 ms."""

    def __init__(self, transport: Transport, kind: str, pid: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.transport, self.kind, self.pid, self.stop = transport, kind, pid, stop
        self.asked = self.answered = 0
        self.failures: list[str] = []
        self.rss: list[tuple[float, int]] = []
        self.last_status: dict = {}

    def run(self) -> None:
        client = self.transport.admin_client() if self.kind == "admin" else self.transport.weight_client(["adaptive"])
        t0 = time.monotonic()
        try:
            while not self.stop.is_set():
                self.asked += 1
                try:
                    if self.kind == "admin":
                        reply = client.call("status", timeout_ms=5000)
                        ok = reply.ok
                        self.last_status = dict(reply.status) if ok else {}
                        self.rss.append((time.monotonic() - t0, _rss_kb(self.pid)))
                    else:
                        ack = client.sync("soak-sync", {"adaptive": 0}, timeout_ms=5000)
                        ok = ack is not None
                except TransportTimeout as exc:
                    ok = False
                    self.failures.append(f"{self.kind}: {exc}")
                self.answered += int(ok)
                time.sleep(0.05)
        finally:
            client.close()


class Hostile(threading.Thread):
    """Bad bytes on every socket: the logs PULL, the admin REP and the sync REP."""

    def __init__(self, ts: TransportSettings, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.ts, self.stop = ts, stop
        self.bad_logs = self.oversize = self.bad_admin = self.bad_sync = 0

    def run(self) -> None:
        rng = random.Random(7)
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(self.ts.endpoint("logs"))
        dealers = {}
        for ch in ("admin", "sync"):
            d = dealers[ch] = ctx.socket(zmq.DEALER)
            d.linger = 0
            d.connect(self.ts.endpoint(ch))
        bad_entry = dict(step=1, request_id="x", tenant="evil", drafter="adaptive", k=1, drafted=2, accepted=3,
                         emitted=9, draft_tokens=[], emitted_tokens=[], confidence=[], weight_version=0)
        payloads = [
            lambda: os.urandom(rng.randrange(1, 2000)),
            lambda: b"",
            lambda: msgpack.packb({"schema_version": SCHEMA_VERSION, "kind": "log_batch", "server_id": "evil",
                                   "seq": rng.randrange(2**63), "entries": [bad_entry]}),
            lambda: msgpack.packb({"schema_version": 999, "kind": "log_batch"}),
            lambda: msgpack.packb([[[[[]]]]] * 1000),
        ]
        try:
            while not self.stop.is_set():
                if rng.random() < 0.05:  # dropped by libzmq with its connection; PUSH reconnects by itself
                    push.send(b"\0" * (MAX_MESSAGE + 1))
                    self.oversize += 1
                    time.sleep(0.2)  # let the reconnection settle: frames queued meanwhile would be lost too
                else:
                    push.send(rng.choice(payloads)())
                    self.bad_logs += 1
                for ch, d in dealers.items():  # a DEALER sends the empty delimiter a REQ would, then junk frames
                    d.send_multipart([b"", os.urandom(rng.randrange(1, 300)), b"extra"] if rng.random() < 0.5
                                     else [b"", msgpack.packb({"kind": "admin_request", "command": "x" * 50})])
                    setattr(self, f"bad_{ch}", getattr(self, f"bad_{ch}") + 1)
                    while d.poll(0):
                        d.recv_multipart()
                time.sleep(0.03)
        finally:
            push.close(0)
            for d in dealers.values():
                d.close(0)
            ctx.term()


def test_soak_with_a_hostile_client_mixed_in():
    root = short_dir("as-soak-")
    ts = TransportSettings(run_dir=root / "run", max_message_bytes=MAX_MESSAGE, request_timeout_ms=5000)
    gen = torch.Generator().manual_seed(0)
    head = AdaptiveHead(AdaptiveConfig(hidden_size=HIDDEN, vocab_size=VOCAB, inner_size=32),
                        torch.randn(VOCAB, HIDDEN, generator=gen), torch.randn(VOCAB, HIDDEN, generator=gen))
    sidecar = spawn_sidecar(ts, root / "state", head=head, settings=SIDECAR, env={"OMP_NUM_THREADS": "1"},
                            ready_timeout_s=120)
    transport = Transport(ts)
    stop = threading.Event()
    senders = [Sender(transport, i, stop) for i in range(SENDERS)]
    admin = Asker(transport, "admin", sidecar.pid, stop)
    sync = Asker(transport, "sync", sidecar.pid, stop)
    hostile = Hostile(ts, stop)
    threads = [*senders, admin, sync, hostile]
    try:
        for t in threads:
            t.start()
        time.sleep(SOAK_S)
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        # every valid request was answered, throughout
        assert admin.asked > 100 and sync.asked > 100
        assert not admin.failures and not sync.failures, (admin.failures + sync.failures)[:3]
        assert admin.answered == admin.asked and sync.answered == sync.asked
        # counts add up (wait for the sidecar to drain what is still queued)
        sent = sum(s.entries_sent for s in senders)
        deadline = time.monotonic() + 30
        while True:
            st = sidecar.status()
            rejected = st["rejected"]
            log_refusals = sum(n for k, n in rejected.items() if k.startswith(("logs.", "entries.")))
            if (st["log_entries_received"] >= sent and log_refusals >= hostile.bad_logs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(f"\nsoak {SOAK_S:.0f} s: {sent} entries from {SENDERS} senders "
              f"({sum(s.dropped for s in senders)} batches dropped at the sender), received {st['log_entries_received']}; "
              f"hostile: {hostile.bad_logs} bad log messages -> {log_refusals} refused, {hostile.oversize} oversize "
              f"-> {st['log_disconnects']} dropped connections, {hostile.bad_admin} bad admin / {hostile.bad_sync} "
              f"bad sync frames; answered {admin.answered}/{admin.asked} status, {sync.answered}/{sync.asked} syncs; "
              f"updates {st['updates']}, version {st['version']}, buffer {st['buffer_samples']}")
        assert all(s.dropped == 0 for s in senders)
        assert st["log_entries_received"] == sent and st["logs_lost"] == 0
        assert log_refusals == hostile.bad_logs
        # each oversize frame cost its connection; the rest are the senders and the hostile PUSH closing
        assert hostile.oversize > 0 and hostile.oversize <= st["log_disconnects"] <= hostile.oversize + SENDERS + 1
        assert sum(n for k, n in rejected.items() if k.startswith("admin.")) >= 1
        # it kept learning and publishing meanwhile
        assert st["updates"] > 0 and st["version"] >= 1 and st["buffer_samples"] > 0
        # RSS bounded: the buffer fills within the first half; the second half adds at most a few MB
        half = [kb for t, kb in admin.rss if t >= SOAK_S / 2]
        first = [kb for t, kb in admin.rss if t < SOAK_S / 2]
        growth_mb = (max(half) - max(first)) / 1024
        print(f"RSS: max {max(first) / 1024:.0f} MB in the first half, {max(half) / 1024:.0f} MB in the second "
              f"({growth_mb:+.1f} MB)")
        assert growth_mb < 16
        assert sidecar.alive()
    finally:
        stop.set()
        transport.close()
        sidecar.stop()
        cleanup(root)
