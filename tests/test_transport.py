"""Transport on real sockets (IPC in a private tmp dir, TCP on 127.0.0.1 with CURVE) and the log publisher."""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from adaspec.core.online import transport as T
from adaspec.core.step import StepRecord
from adaspec.core.online.logs import LogPublisher
from adaspec.core.online.settings import CurveKeys, TransportSettings
from adaspec.core.online.weights import WeightStager, WeightSubscriber
from adaspec.core.online.wire import AdminReply, LogBatch, WeightUpdate, encode

WAIT_MS = 3000  # generous upper bound for things that should arrive; absent things are waited for less


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    T.stop_authenticators(c)
    c.destroy(linger=0)


@pytest.fixture
def run_dir():
    """Short private dir (IPC paths are limited to 107 bytes, pytest's tmp_path can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="as-"))
    yield d / "run"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def transport(run_dir, ctx):
    t = T.Transport(TransportSettings(run_dir=run_dir, request_timeout_ms=1000), context=ctx)
    yield t
    t.close()


def _keys() -> tuple[CurveKeys, CurveKeys]:
    """(server keys, client keys that trust that server)."""
    spub, ssec = zmq.curve_keypair()
    cpub, csec = zmq.curve_keypair()
    return CurveKeys(spub, ssec), CurveKeys(cpub, csec, server_public=spub)


def _batch(server: str, seq: int) -> bytes:
    return encode(LogBatch(server_id=server, seq=seq, entries=[]))


def _drain(puller: T.LogPuller, n: int) -> list[LogBatch]:
    out = []
    deadline = time.monotonic() + WAIT_MS / 1000
    while len(out) < n and time.monotonic() < deadline:
        b = puller.recv(100)
        if b is not None:
            out.append(b)
    return out


def _record(i: int, drafter: str | None = "suffix") -> StepRecord:
    k = 2 if drafter else 0
    return StepRecord(step=i, request_id=f"r{i % 3}", tenant="t", drafter=drafter, k=k, drafted=k,
                      accepted=min(1, k), emitted=min(1, k) + 1, confidence=[0.5] * k, batch_size=1,
                      chunk_tokens=k + 1, draft_s=0.0, verify_s=0.0, prefill=False, weight_version=7 if drafter else 0)


# -- logs ---------------------------------------------------------------------------------------------------------


def test_logs_flow_from_two_pushers_over_ipc(transport, run_dir):
    puller = transport.log_puller()
    a, b = transport.log_pusher(), transport.log_pusher()
    try:
        for i in range(5):
            assert a.send(_batch("a", i)) and b.send(_batch("b", i))
        got = _drain(puller, 10)
        assert sorted((x.server_id, x.seq) for x in got) == sorted([("a", i) for i in range(5)] +
                                                                   [("b", i) for i in range(5)])
        sock = run_dir / "adaspec-logs.sock"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    finally:
        a.close(), b.close(), puller.close()


def test_ipc_socket_mode_is_0600_even_with_permissive_umask(ctx, run_dir):
    old = os.umask(0)
    try:
        puller = T.LogPuller(ctx, f"ipc://{run_dir}/x.sock")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(run_dir / "x.sock").st_mode) == 0o600
    finally:
        puller.close()


def test_unsafe_ipc_locations_refused(ctx, run_dir):
    run_dir.mkdir(mode=0o700)
    shared = run_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(T.TransportError, match="writable by others"):
        T.LogPuller(ctx, f"ipc://{shared}/x.sock")
    with pytest.raises(T.TransportError, match="abstract"):
        T.LogPuller(ctx, "ipc://@adaspec-test")
    with pytest.raises(T.TransportError, match="longer than"):
        T.LogPuller(ctx, f"ipc://{run_dir}/{'x' * 120}.sock")


def test_full_queue_drops_and_counts_without_blocking(transport):
    """HWM reached with nobody reading: send returns False at once and counts the drop."""
    pusher = T.LogPusher(transport.ctx, transport.settings.endpoint("logs"), sndhwm=2)  # no puller bound
    try:
        data = _batch("a", 0)
        t0 = time.monotonic()
        results = [pusher.send(data) for _ in range(50)]
        assert time.monotonic() - t0 < 1.0
        assert results.count(False) >= 45 and pusher.dropped == results.count(False)
    finally:
        pusher.close()


def test_log_publisher_over_sockets(transport):
    registry = CollectorRegistry()
    puller = transport.log_puller()
    pub = LogPublisher.from_transport(transport, "srv-1", batch_entries=4, flush_s=10.0, feature_sample_rate=1.0,
                                      features_of=lambda rec: torch.ones(rec.accepted + 1, 2),
                                      registry=registry)
    try:
        pub([_record(i) for i in range(3)])  # 3 < 4 entries and flush_s not reached: buffered
        assert puller.recv(200) is None
        pub([_record(3), _record(4, drafter=None)])
        batch = puller.recv(WAIT_MS)
        assert batch is not None and batch.seq == 0 and len(batch.entries) == 4
        e = batch.entries[0]
        assert e.weight_version == 7 and e.features is not None and e.features.shape == [2, 2]
        assert pub.flush() and puller.recv(WAIT_MS).entries[0].drafter is None  # explicit flush of the rest
        labels = {"server": "srv-1"}
        assert registry.get_sample_value("adaspec_log_batches_sent_total", labels) == 2.0
        assert registry.get_sample_value("adaspec_log_entries_sent_total", labels) == 5.0
    finally:
        pub.close()
        puller.close()


def test_log_publisher_drops_counts_and_never_raises():
    registry = CollectorRegistry()
    pub = LogPublisher(lambda data: False, "srv-2", batch_entries=2, registry=registry)
    pub([_record(i) for i in range(4)])  # two batches, both refused by a full queue
    assert registry.get_sample_value("adaspec_log_batches_dropped_total",
                                     {"server": "srv-2", "reason": "queue_full"}) == 2.0
    assert pub.seq == 2  # drops show up as gaps in seq on the sidecar

    def boom(data):
        raise RuntimeError("socket exploded")

    pub = LogPublisher(boom, "srv-3", batch_entries=1, registry=registry)
    pub([_record(0)])  # must not raise into the engine
    bad = _record(1)
    bad.accepted = 5  # inconsistent record: dropped as invalid, the rest still flows
    sent = []
    pub2 = LogPublisher(lambda d: sent.append(d) or True, "srv-4", batch_entries=1, registry=registry)
    pub2([bad, _record(2)])
    pub2(None)  # type: ignore[arg-type]  # garbage in: swallowed and counted
    assert len(sent) == 1
    assert registry.get_sample_value("adaspec_log_publisher_errors_total", {"server": "srv-3"}) == 1.0
    assert registry.get_sample_value("adaspec_log_entries_dropped_total",
                                     {"server": "srv-4", "reason": "invalid"}) == 1.0
    assert registry.get_sample_value("adaspec_log_publisher_errors_total", {"server": "srv-4"}) == 1.0


def test_puller_counts_and_skips_garbage(transport):
    puller = transport.log_puller()
    raw = transport.ctx.socket(zmq.PUSH)
    raw.linger = 0
    raw.connect(transport.settings.endpoint("logs"))
    try:
        raw.send(b"\xc1garbage")
        raw.send(_batch("a", 1))
        got = puller.recv(WAIT_MS)
        assert got is not None and got.seq == 1 and puller.rejected["malformed"] == 1
    finally:
        raw.close(), puller.close()


# -- TCP + CURVE ------------------------------------------------------------------------------------------------


def test_tcp_without_curve_refuses_to_start(ctx):
    with pytest.raises(ValidationError, match="CURVE"):
        TransportSettings(logs_endpoint="tcp://127.0.0.1:5555")
    with pytest.raises(T.TransportError, match="CURVE"):
        T.LogPuller(ctx, "tcp://127.0.0.1:*")
    with pytest.raises(T.TransportError, match="CURVE"):
        T.LogPusher(ctx, "tcp://127.0.0.1:5555")
    server, _ = _keys()
    with pytest.raises(T.TransportError, match="public key"):
        T.LogPusher(ctx, "tcp://127.0.0.1:5555", CurveKeys(server.public, server.secret))  # no server key


def test_settings_with_curve_keys(tmp_path):
    pub, sec = zmq.curve_keypair()
    s = TransportSettings(run_dir=tmp_path, logs_endpoint="tcp://127.0.0.1:7000", curve_public_key=pub.decode(),
                          curve_secret_key=sec.decode(), curve_server_key=pub.decode())
    keys = s.curve_keys()
    assert keys.public == pub and keys.secret == sec and keys.server_public == pub
    assert s.endpoint("admin") == f"ipc://{tmp_path}/adaspec-admin.sock"
    with pytest.raises(ValidationError):
        TransportSettings(curve_public_key="short", curve_secret_key=sec.decode())
    _, secret_file = zmq.auth.create_certificates(str(tmp_path), "me")
    s2 = TransportSettings(logs_endpoint="tcp://127.0.0.1:7000", curve_key_file=secret_file)
    assert len(s2.curve_keys().public) == 40
    other_pub, _ = zmq.curve_keypair()  # D21: a public key that is not the secret's is refused up front
    bad = TransportSettings(run_dir=tmp_path, logs_endpoint="tcp://127.0.0.1:7000",
                            curve_public_key=other_pub.decode(), curve_secret_key=sec.decode())
    with pytest.raises(ValueError, match="does not belong"):
        bad.curve_keys()


def _allow(tmp_path, *publics: bytes) -> Path:
    """An allow-list dir holding these client public keys (as ZMQ certificates)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir(exist_ok=True)
    for i, pub in enumerate(publics):
        (allowed / f"c{i}.key").write_text(f'metadata\ncurve\n    public-key = "{pub.decode()}"\n')
    return allowed


def test_tcp_without_an_allow_list_refuses_to_bind(ctx):
    """D3: CURVE alone authorised any client that knew the server's public key (remote pause/reset/export)."""
    server, _ = _keys()
    with pytest.raises(T.TransportError, match="allow-list"):
        T.LogPuller(ctx, "tcp://127.0.0.1:*", server)


def test_tcp_curve_logs_flow_and_wrong_server_key_is_not_heard(ctx, tmp_path):
    server, client = _keys()
    b_keys = zmq.curve_keypair()
    server = CurveKeys(server.public, server.secret, authorized_dir=_allow(tmp_path, client.public, b_keys[0]))
    puller = T.LogPuller(ctx, "tcp://127.0.0.1:*", server)
    a = T.LogPusher(ctx, puller.endpoint, client)
    b = T.LogPusher(ctx, puller.endpoint, CurveKeys(*b_keys, server_public=server.public))
    impostor_key = zmq.curve_keypair()[0]
    wrong = T.LogPusher(ctx, puller.endpoint, CurveKeys(client.public, client.secret, server_public=impostor_key))
    try:
        assert a.send(_batch("a", 0)) and b.send(_batch("b", 0))
        assert sorted(x.server_id for x in _drain(puller, 2)) == ["a", "b"]
        wrong.send(_batch("wrong", 0))
        assert puller.recv(500) is None  # the handshake fails: nothing from the wrong key ever arrives
    finally:
        a.close(), b.close(), wrong.close(), puller.close()


def test_curve_allow_list_refuses_unknown_clients(ctx, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    cert_pub, cert_sec = zmq.auth.create_certificates(str(tmp_path), "client")
    shutil.copy(cert_pub, allowed)
    server_pub, server_sec = zmq.curve_keypair()
    puller = T.LogPuller(ctx, "tcp://127.0.0.1:*", CurveKeys(server_pub, server_sec, authorized_dir=allowed))
    cpub, csec = zmq.auth.load_certificate(cert_sec)
    good = T.LogPusher(ctx, puller.endpoint, CurveKeys(cpub, csec, server_public=server_pub))
    stranger = T.LogPusher(ctx, puller.endpoint, CurveKeys(*zmq.curve_keypair(), server_public=server_pub))
    try:
        stranger.send(_batch("stranger", 0))
        good.send(_batch("good", 0))
        assert [x.server_id for x in _drain(puller, 1)] == ["good"]
        assert puller.recv(300) is None
    finally:
        good.close(), stranger.close(), puller.close()


# -- weights ----------------------------------------------------------------------------------------------------


def _wait(cond, timeout_s: float = WAIT_MS / 1000) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_late_subscriber_gets_current_version_then_follows_pub(transport):
    head = torch.nn.Linear(3, 2)
    v1 = {k: torch.randn(v.shape) for k, v in head.state_dict().items()}
    publisher = transport.weight_publisher()
    publisher.publish(WeightUpdate.build("eagle", 1, v1))  # nobody subscribed yet
    stager = WeightStager(head, "eagle", registry=CollectorRegistry())
    sub = WeightSubscriber(transport, [stager], "srv-1", resync_s=60.0).start()
    try:
        assert sub.synced.wait(WAIT_MS / 1000)
        assert _wait(lambda: stager.staged_version == 1)
        stager.apply_if_staged()
        assert torch.equal(head.weight, v1["weight"])
        v2 = {k: torch.randn(v.shape) for k, v in head.state_dict().items()}
        deadline = time.monotonic() + WAIT_MS / 1000
        publisher.publish(WeightUpdate.build("eagle", 2, v2))
        publisher.publish(WeightUpdate.build("other", 1, {"x": torch.zeros(1)}))  # not subscribed to
        while stager.staged_version != 2 and time.monotonic() < deadline:  # PUB path (slow-joiner tolerant)
            time.sleep(0.02)
        assert stager.staged_version == 2
        stager.apply_if_staged()
        assert torch.equal(head.bias, v2["bias"]) and stager.version == 2
        assert publisher.versions() == {"eagle": 2, "other": 1}
    finally:
        sub.stop()
        publisher.close()


def test_sync_request_answers_only_newer(transport):
    publisher = transport.weight_publisher()
    client = transport.weight_client(["eagle"])
    try:
        publisher.publish(WeightUpdate.build("eagle", 3, {"w": torch.ones(2)}))
        ack = client.sync("srv", {"eagle": 3})
        assert ack.versions == {"eagle": 3} and ack.updates == []
        ack = client.sync("srv", {"eagle": 2})
        assert [u.version for u in ack.updates] == [3]
        with pytest.raises(ValueError):
            publisher.publish(WeightUpdate.build("eagle", 3, {"w": torch.ones(2)}))
    finally:
        client.close()
        publisher.close()


# -- admin ------------------------------------------------------------------------------------------------------


def test_admin_to_dead_peer_times_out_cleanly(transport):
    client = transport.admin_client()  # nothing is bound at the admin endpoint
    try:
        t0 = time.monotonic()
        with pytest.raises(T.TransportTimeout):
            client.call("status", timeout_ms=200)
        assert time.monotonic() - t0 < 2.0 and client.resets == 1
        with pytest.raises(T.TransportTimeout):  # the reset socket is usable again (no EFSM)
            client.call("status", timeout_ms=100)
        server = transport.admin_server()  # the peer comes up: the same client now gets answers
        stop = threading.Event()

        def serve():
            while not stop.is_set():
                server.handle_one(lambda req: AdminReply(ok=True, status={"cmd": req.command, **req.args}), 50)

        th = threading.Thread(target=serve)
        th.start()
        try:
            reply = client.call("status", timeout_ms=WAIT_MS, verbose=True)
            assert reply.ok and reply.status == {"cmd": "status", "verbose": True}
        finally:
            stop.set()
            th.join()
            server.close()
    finally:
        client.close()


def test_admin_handler_errors_become_error_replies(transport):
    server = transport.admin_server()
    client = transport.admin_client()
    stop = threading.Event()

    def handler(req):
        raise RuntimeError("kaput")

    th = threading.Thread(target=lambda: [server.handle_one(handler, 50) for _ in iter(stop.is_set, True)])
    th.start()
    try:
        reply = client.call("status", timeout_ms=WAIT_MS)
        assert not reply.ok and "kaput" in reply.error
    finally:
        stop.set()
        th.join()
        server.close()
        client.close()


def _raw_request(transport, name: str, frames: list[bytes], timeout_ms: int = 3000) -> bytes | None:
    """A hand-rolled REQ on endpoint `name` sending `frames` as one multi-frame message; the reply or None."""
    sock = transport.ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(transport.settings.endpoint(name))
        sock.send_multipart(frames)
        return sock.recv() if sock.poll(timeout_ms, zmq.POLLIN) else None
    finally:
        sock.close(linger=0)


def test_multi_frame_requests_get_an_error_reply_and_the_admin_channel_keeps_serving(transport):
    """D5: an N-frame admin request costs one error reply, not N seconds of a stalled loop; D1: a reply the
    wire cannot encode (an int past 64 bits) becomes an error reply instead of a REP socket stuck forever."""
    from adaspec.core.online.wire import decode

    server = transport.admin_server()
    client = transport.admin_client()
    stop = threading.Event()

    def handler(req):
        if req.command == "status" and req.args.get("huge"):
            return AdminReply(ok=True, status={"lost": 2**64 + 5})  # what six hostile seq jumps once produced
        return AdminReply(ok=True, status={"cmd": req.command})

    th = threading.Thread(target=lambda: [server.handle_one(handler, 20) for _ in iter(stop.is_set, True)])
    th.start()
    try:
        t0 = time.monotonic()
        for n in (2, 30):
            out = _raw_request(transport, "admin", [b"x"] * n)
            assert out is not None, f"no reply to a {n}-frame request"
            reply = decode(out, expect=AdminReply)
            assert not reply.ok and f"{n} frames" in reply.error
        assert time.monotonic() - t0 < 2.0
        bad = client.call("status", timeout_ms=WAIT_MS, huge=True)
        assert not bad.ok and "not encodable" in bad.error
        good = client.call("status", timeout_ms=WAIT_MS)
        assert good.ok and good.status == {"cmd": "status"}
        assert server.rejected["frames"] == 2 and server.rejected["unencodable_reply"] == 1
    finally:
        stop.set()
        th.join()
        server.close()
        client.close()


def test_a_two_frame_sync_request_does_not_kill_the_weight_sync_thread(transport):
    """D2: the 2-frame Hello that used to kill `adaspec-weight-sync` for good now gets an error reply, and the
    sync path goes on answering real servers."""
    publisher = transport.weight_publisher()
    client = transport.weight_client(["eagle"])
    try:
        publisher.publish(WeightUpdate.build("eagle", 4, {"w": torch.ones(2)}))
        assert _raw_request(transport, "sync", [b"hello", b"again"]) is not None
        assert _raw_request(transport, "sync", [b"\xc1garbage"]) is not None
        assert publisher._thread.is_alive()
        ack = client.sync("srv", {"eagle": 0})
        assert [u.version for u in ack.updates] == [4]
    finally:
        client.close()
        publisher.close()


def test_symlinked_or_sticky_shared_run_dirs_are_refused(ctx, run_dir):
    """D4: the private-dir check no longer follows a symlink another user planted, nor accepts a sticky
    world-writable dir (what /tmp is), where the bind->chmod race was won 9 times in 12."""
    run_dir.mkdir(mode=0o700)
    real = run_dir / "real"
    real.mkdir(mode=0o700)
    link = run_dir / "link"
    link.symlink_to(real)
    with pytest.raises(T.TransportError, match="symlink"):
        T.LogPuller(ctx, f"ipc://{link}/x.sock")
    sticky = run_dir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with pytest.raises(T.TransportError, match="writable by others"):
        T.LogPuller(ctx, f"ipc://{sticky}/x.sock")
    puller = T.LogPuller(ctx, f"ipc://{real}/x.sock")  # a private dir of ours is fine
    puller.close()


def test_a_socket_we_may_not_use_is_reported_as_such(ctx, run_dir, monkeypatch):
    """D22: another user's sidecar socket (0600, not ours) used to show as "no reply within 2000 ms"; the client
    now says permission denied at once. (Root may open anything, so the access check is simulated.)"""
    run_dir.mkdir(mode=0o700)
    sock_path = run_dir / "adaspec-admin.sock"
    sock_path.write_text("")
    monkeypatch.setattr(T.os, "access", lambda path, mode: False)
    with pytest.raises(T.TransportError, match="permission denied"):
        T.Transport(TransportSettings(run_dir=run_dir), context=ctx).admin_client()


def _free_tcp_endpoints(n: int) -> list[str]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    for s in socks:
        s.close()
    return out


def test_an_unknown_client_key_is_heard_on_none_of_the_four_sockets(tmp_path):
    """TCP with an allow-list: a client whose key is listed reaches logs, weights, sync and admin; a client with
    the server's public key but an unlisted key of its own reaches none of them. Without an allow-list the bind
    is refused, unless the insecure mode is asked for by name (then the stranger is admitted: the control)."""
    logs, weights, sync, admin = _free_tcp_endpoints(4)
    endpoints = dict(logs_endpoint=logs, weights_endpoint=weights, sync_endpoint=sync, admin_endpoint=admin)
    server_pub, server_sec = zmq.curve_keypair()
    friend_pub, friend_sec = zmq.curve_keypair()
    allowed = _allow(tmp_path, friend_pub)

    def settings(pub, sec, **kw) -> TransportSettings:
        return TransportSettings(run_dir=tmp_path / "run", curve_public_key=pub.decode(),
                                 curve_secret_key=sec.decode(), request_timeout_ms=600, **endpoints, **kw)

    def serve(t: T.Transport):
        puller, publisher, admin_server = t.log_puller(), t.weight_publisher(), t.admin_server()
        publisher.publish(WeightUpdate.build("eagle", 1, {"w": torch.ones(2)}))
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                admin_server.handle_one(lambda req: AdminReply(ok=True, status={}), 50)

        th = threading.Thread(target=loop, daemon=True)
        th.start()

        def close():
            stop.set()
            th.join(5)
            puller.close(), publisher.close(), admin_server.close()

        return puller, publisher, close

    versions = itertools.count(2)

    def heard(client: T.Transport, puller, publisher) -> dict[str, bool]:
        out = {}
        pusher = client.log_pusher()
        wc = client.weight_client(["eagle"])
        ac = client.admin_client()
        try:
            pusher.send(_batch("probe", 0))
            out["logs"] = puller.recv(800) is not None
            try:
                out["sync"] = "eagle" in wc.sync("srv", {"eagle": 0}, timeout_ms=600).versions
            except T.TransportTimeout:
                out["sync"] = False
            got = None
            for _ in range(4):  # PUB: keep publishing while the subscriber (maybe) joins
                publisher.publish(WeightUpdate.build("eagle", next(versions), {"w": torch.ones(2)}))
                got = got or wc.recv(200)
            out["weights"] = got is not None
            try:
                out["admin"] = ac.call("status", timeout_ms=600).ok
            except T.TransportTimeout:
                out["admin"] = False
        finally:
            pusher.close(), wc.close(), ac.close()
        return out

    server = T.Transport(settings(server_pub, server_sec, curve_authorized_keys_dir=allowed))
    friend = T.Transport(settings(friend_pub, friend_sec, curve_server_key=server_pub.decode()))
    stranger = T.Transport(settings(*zmq.curve_keypair(), curve_server_key=server_pub.decode()))
    puller, publisher, close = serve(server)
    try:
        assert heard(friend, puller, publisher) == dict(logs=True, sync=True, weights=True, admin=True)
        assert heard(stranger, puller, publisher) == dict(logs=False, sync=False, weights=False, admin=False)
    finally:
        close()
        for t in (server, friend, stranger):
            t.close()
    with pytest.raises(T.TransportError, match="allow-list"):
        T.Transport(settings(server_pub, server_sec)).log_puller()
    server = T.Transport(settings(server_pub, server_sec, curve_allow_any_client=True))  # explicitly insecure
    stranger = T.Transport(settings(*zmq.curve_keypair(), curve_server_key=server_pub.decode()))
    puller, publisher, close = serve(server)
    try:
        assert heard(stranger, puller, publisher)["admin"] is True
    finally:
        close()
        server.close(), stranger.close()
