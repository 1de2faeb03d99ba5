"""ZeroMQ endpoints between serving processes and the sidecar.

Topology: the sidecar binds every socket, servers connect (so any number of servers can join or restart).

* logs     servers PUSH -> sidecar PULL. Sends are NOBLOCK: at the high-water mark a batch is dropped and
           counted, the serving loop never waits on the sidecar.
* weights  sidecar PUB -> servers SUB (topic = drafter name + NUL, so 'eagle' never matches 'eagle2').
* sync     servers REQ -> sidecar REP: a (re)starting server sends Hello and gets every newer update at once;
           servers re-ask periodically, which also covers updates PUB dropped or a slow-joining SUB missed.
* admin    operator REQ -> sidecar REP.

Every receive polls with a timeout and every REQ is closed and re-created after a timeout (a REQ socket that
missed its reply is stuck otherwise), so a dead peer never hangs the caller. IPC sockets live in a private
directory and are chmod-ed 0600 right after bind (and checked); TCP endpoints must use CURVE.
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import zmq
from zmq.auth.thread import ThreadAuthenticator

from adaspec.core.errors import AdaspecError
from adaspec.core.online.settings import CurveKeys, TransportSettings
from adaspec.core.online.wire import (
    DEFAULT_LIMITS,
    INVALID,
    MALFORMED,
    Ack,
    AdminReply,
    AdminRequest,
    Hello,
    LogBatch,
    WeightUpdate,
    WireError,
    WireLimits,
    decode,
    encode,
)

M = TypeVar("M")
_IPC_PATH_MAX = 107  # sun_path is 108 bytes on Linux, NUL included
_ZAP_DOMAIN = "adaspec"  # the ZAP handler checks client keys for this domain only


class TransportError(AdaspecError):
    """An endpoint cannot be set up safely (bad endpoint, missing CURVE keys, unsafe IPC path) or failed."""


class TransportTimeout(TransportError):
    """The peer did not answer within the timeout (it may be dead); the requesting socket was reset."""


# -- socket setup -----------------------------------------------------------------------------------------------

_auth_lock = threading.Lock()
_authenticators: dict[int, ThreadAuthenticator] = {}


def _ensure_authenticator(ctx: zmq.Context, authorized_dir: Path | None) -> None:
    """One ZAP handler per context, allowing only client certificates found in `authorized_dir` (None: any
    client -- the explicit insecure mode)."""
    with _auth_lock:
        if id(ctx) in _authenticators:
            return
        if authorized_dir is not None and not authorized_dir.is_dir():
            raise TransportError(f"curve_authorized_keys_dir {authorized_dir} is not a directory")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain=_ZAP_DOMAIN,
                             location=zmq.auth.CURVE_ALLOW_ANY if authorized_dir is None else str(authorized_dir))
        _authenticators[id(ctx)] = auth


def stop_authenticators(ctx: zmq.Context) -> None:
    """Stop the ZAP handler of `ctx` (call before terminating the context)."""
    with _auth_lock:
        auth = _authenticators.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def _secure(sock: zmq.Socket, endpoint: str, keys: CurveKeys | None, server: bool) -> None:
    """CURVE on TCP (mandatory); IPC relies on file permissions instead."""
    if not endpoint.startswith("tcp://"):
        if not endpoint.startswith("ipc://"):
            raise TransportError(f"unsupported endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT")
        return
    if keys is None:
        raise TransportError(
            f"refusing to use {endpoint} without CURVE keys: set ADASPEC_TRANSPORT_CURVE_PUBLIC_KEY/"
            "_CURVE_SECRET_KEY (or _CURVE_KEY_FILE), or use an ipc:// endpoint"
        )
    if not zmq.has("curve"):
        raise TransportError("this libzmq was built without CURVE support; tcp endpoints are unavailable")
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    if server:
        if keys.authorized_dir is None and keys.allow_any_client:
            log.warning("binding %s with CURVE but no allow-list (curve_allow_any_client): any client that knows "
                        "the server's public key is admitted", endpoint)
        elif keys.authorized_dir is None:  # D3: CURVE alone admits anyone who holds the server's public key
            raise TransportError(
                f"refusing to bind {endpoint} without an allow-list of client keys: set "
                "ADASPEC_TRANSPORT_CURVE_AUTHORIZED_KEYS_DIR (a dir of the clients' public certificates); "
                "CURVE without it lets anyone who knows the server's public key pause, reset or export "
                "(ADASPEC_TRANSPORT_CURVE_ALLOW_ANY_CLIENT=1 accepts that risk explicitly)"
            )
        sock.curve_server = True
        _ensure_authenticator(sock.context, keys.authorized_dir)
        sock.zap_domain = _ZAP_DOMAIN.encode()
    else:
        if keys.server_public is None:
            raise TransportError(f"connecting to {endpoint} needs the sidecar's public key (curve_server_key)")
        sock.curve_serverkey = keys.server_public


def private_dir(path: Path) -> None:
    """Create the socket dir 0700, or refuse an existing one another user could plant or swap files in
    (the bind->chmod race): a symlink (even to a dir of ours), a dir not owned by us, or one writable by group
    or others -- sticky or not (/tmp itself is sticky and world-writable)."""
    if not os.path.lexists(path):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise TransportError(f"IPC socket dir {path} is a symlink; use a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise TransportError(f"IPC socket dir {path} is not a directory")
    if st.st_uid != os.getuid():
        raise TransportError(f"IPC socket dir {path} is owned by uid {st.st_uid}, not us ({os.getuid()})")
    if st.st_mode & 0o022:
        raise TransportError(f"IPC socket dir {path} is writable by others (mode {oct(st.st_mode & 0o777)})")


def bind(sock: zmq.Socket, endpoint: str, keys: CurveKeys | None = None) -> str:
    """Bind securely: CURVE server on TCP; on IPC a private dir and a socket file checked to be 0600.

    Returns the bound endpoint (with the real port when `tcp://HOST:*` asked for any free one)."""
    _secure(sock, endpoint, keys, server=True)
    if endpoint.startswith("ipc://"):
        raw = endpoint[len("ipc://"):]
        if raw.startswith("@") or not raw:
            raise TransportError(f"{endpoint}: abstract/empty IPC names have no permissions; use a file path")
        path = Path(raw)
        if len(str(path).encode()) > _IPC_PATH_MAX:
            raise TransportError(f"IPC path {path} is longer than {_IPC_PATH_MAX} bytes; use a shorter run_dir")
        private_dir(path.parent)
        sock.bind(endpoint)
        os.chmod(path, 0o600)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode != 0o600:
            sock.close(linger=0)
            raise TransportError(f"IPC socket {path} has mode {oct(mode)}, expected 0o600")
    else:
        sock.bind(endpoint)
    return sock.last_endpoint.decode()


def connect(sock: zmq.Socket, endpoint: str, keys: CurveKeys | None = None) -> None:
    """Connect (libzmq retries in the background, so a socket that exists but is not ours would only show as
    a timeout much later: D22 -- say "permission denied" now instead)."""
    _secure(sock, endpoint, keys, server=False)
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            raise TransportError(f"permission denied on {path}: the sidecar there runs as another user "
                                 "(its sockets are 0600)")
    sock.connect(endpoint)


def _socket(ctx: zmq.Context, kind: int, limits: WireLimits | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    if limits is not None:  # peers sending more than this are disconnected by libzmq before we read anything
        sock.maxmsgsize = limits.max_message_bytes
    return sock


# -- logs -------------------------------------------------------------------------------------------------------


class LogPusher:
    """Server side of the log channel: `send` never blocks; at the high-water mark the batch is dropped."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys: CurveKeys | None = None, sndhwm: int = 256) -> None:
        self._sock = _socket(ctx, zmq.PUSH)
        self._sock.sndhwm = sndhwm
        self._sock.sndtimeo = 0
        try:
            connect(self._sock, endpoint, keys)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self.sent = 0
        self.dropped = 0

    def send(self, data: bytes) -> bool:
        """Queue one encoded batch; False (and counted) when the queue is full or no peer can take it."""
        try:
            self._sock.send(data, zmq.NOBLOCK, copy=len(data) < 65536)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close(linger=0)


class LogPuller:
    """Sidecar side of the log channel: several servers may push into it. Bad messages are counted and skipped."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        keys: CurveKeys | None = None,
        rcvhwm: int = 4096,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> None:
        self.limits = limits
        self._sock = _socket(ctx, zmq.PULL, limits)
        self._sock.rcvhwm = rcvhwm
        try:
            self.endpoint = bind(self._sock, endpoint, keys)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self.rejected: collections.Counter[str] = collections.Counter()
        #: Log peers whose connection ended. libzmq drops a frame over `max_message_bytes` *and* the connection
        #: that sent it before we can read a byte (D19: such frames were counted nowhere); this is their trace,
        #: beside peers that simply went away (a server restart).
        self.disconnects = 0
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def _count_disconnects(self) -> None:
        while self._monitor.poll(0, zmq.POLLIN):
            try:
                self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.disconnects += 1

    def recv(self, timeout_ms: int) -> LogBatch | None:
        """The next valid batch, or None once `timeout_ms` passes without one."""
        deadline = _Deadline(timeout_ms)
        while True:
            ready = self._sock.poll(deadline.left_ms(), zmq.POLLIN)
            self._count_disconnects()
            if not ready:
                return None
            data = self._sock.recv(zmq.NOBLOCK)
            try:
                return decode(data, self.limits, expect=LogBatch)
            except WireError as exc:
                self.rejected[exc.reason] += 1
            if deadline.left_ms() <= 0:
                return None

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._sock.close(linger=0)


# -- request/reply ----------------------------------------------------------------------------------------------


class ReqClient:
    """A REQ socket that never hangs: each request polls with a timeout, and a timed-out socket is replaced."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        keys: CurveKeys | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        timeout_ms: int = 2000,
    ) -> None:
        self._ctx, self._endpoint, self._keys = ctx, endpoint, keys
        self.limits, self.timeout_ms = limits, timeout_ms
        self.resets = 0
        self._sock = self._new_socket()

    def _new_socket(self) -> zmq.Socket:
        sock = _socket(self._ctx, zmq.REQ, self.limits)
        try:
            connect(sock, self._endpoint, self._keys)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _reset(self) -> None:
        self._sock.close(linger=0)
        self._sock = self._new_socket()
        self.resets += 1

    def request(self, msg, expect: type[M], timeout_ms: int | None = None) -> M:
        """Send `msg`, return the decoded reply; TransportTimeout if none comes in time, TransportError if bad."""
        deadline = _Deadline(self.timeout_ms if timeout_ms is None else timeout_ms)
        data = encode(msg, self.limits)
        if not self._sock.poll(deadline.left_ms(), zmq.POLLOUT):
            self._reset()
            raise TransportTimeout(f"{self._endpoint}: could not send within {deadline.total_ms} ms")
        try:
            self._sock.send(data, zmq.NOBLOCK)
        except zmq.Again:  # the peer's pipe went away between poll and send (a refused CURVE handshake does that)
            self._reset()
            raise TransportTimeout(f"{self._endpoint}: could not send (the connection dropped)") from None
        if not self._sock.poll(deadline.left_ms(), zmq.POLLIN):
            self._reset()
            raise TransportTimeout(f"{self._endpoint}: no reply within {deadline.total_ms} ms")
        reply = self._sock.recv(zmq.NOBLOCK)
        try:
            return decode(reply, self.limits, expect=expect)  # type: ignore[arg-type]
        except WireError as exc:
            raise TransportError(f"{self._endpoint}: bad reply ({exc})") from None

    def close(self) -> None:
        self._sock.close(linger=0)


log = logging.getLogger(__name__)


class RepServer:
    """A REP socket served one request at a time by a handler. Every request gets a reply and the socket keeps
    serving whatever a peer sends: a message of several frames, one that does not decode, a handler that
    fails, a reply that cannot be encoded -- each becomes an error reply (counted in `rejected`), so one bad
    peer costs one message, never the channel."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        keys: CurveKeys | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> None:
        self.limits = limits
        self._sock = _socket(ctx, zmq.REP, limits)
        try:
            self.endpoint = bind(self._sock, endpoint, keys)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self.rejected: collections.Counter[str] = collections.Counter()

    def handle_one(self, handler: Callable[[object], object], timeout_ms: int, expect: type | None = None) -> bool:
        """Answer at most one request arriving within `timeout_ms`; True if one was answered."""
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            return False
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)  # the whole message: REP cannot reply mid-message
        except zmq.Again:
            return False
        if len(frames) != 1:
            self.rejected["frames"] += 1
            reply: object = AdminReply(ok=False, error=f"bad request: {len(frames)} frames (one expected)")
        else:
            try:
                reply = handler(decode(frames[0], self.limits, expect=expect))
            except WireError as exc:
                self.rejected[exc.reason] += 1
                reply = AdminReply(ok=False, error=f"bad request: {exc}")
            except Exception as exc:  # a handler bug must not kill the REP loop or leave the peer waiting
                reply = AdminReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        try:
            out = encode(reply, self.limits)  # type: ignore[arg-type]
        except Exception as exc:  # WireError, or msgpack's OverflowError for an int past 64 bits, ...
            self.rejected["unencodable_reply"] += 1
            out = encode(AdminReply(ok=False, error=f"reply not encodable: {type(exc).__name__}"), self.limits)
        self._sock.send(out, zmq.NOBLOCK)
        return True

    def close(self) -> None:
        self._sock.close(linger=0)


class AdminClient(ReqClient):
    def call(self, command: str, timeout_ms: int | None = None, **args) -> AdminReply:
        return self.request(AdminRequest(command=command, args=args), AdminReply, timeout_ms)


class AdminServer(RepServer):
    def handle_one(self, handler: Callable[[AdminRequest], AdminReply], timeout_ms: int, expect=AdminRequest) -> bool:  # type: ignore[override]
        return super().handle_one(handler, timeout_ms, expect)  # type: ignore[arg-type]


# -- weights ----------------------------------------------------------------------------------------------------


def topic(drafter: str) -> bytes:
    return drafter.encode() + b"\0"


class WeightPublisher:
    """Sidecar side: PUB for live updates plus a background REP thread answering Hello with newer updates.

    `publish` must be called from one thread (it owns the PUB socket); the REP thread only reads the
    latest-update table under a lock.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        pub_endpoint: str,
        sync_endpoint: str,
        keys: CurveKeys | None = None,
        hwm: int = 4,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> None:
        self.limits = limits
        self._pub = _socket(ctx, zmq.PUB)
        self._pub.sndhwm = hwm
        try:
            self.pub_endpoint = bind(self._pub, pub_endpoint, keys)
            self._rep = RepServer(ctx, sync_endpoint, keys, limits)
            self.sync_endpoint = self._rep.endpoint
        except BaseException:
            self._pub.close(linger=0)
            raise
        self._latest: dict[str, WeightUpdate] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sync_errors = 0
        self._thread = threading.Thread(target=self._serve, name="adaspec-weight-sync", daemon=True)
        self._thread.start()

    def publish(self, update: WeightUpdate) -> None:
        """Make `update` the current version of its drafter and broadcast it (PUB drops at HWM, never blocks)."""
        data = encode(update, self.limits)
        with self._lock:
            current = self._latest.get(update.drafter)
            if current is not None and update.version <= current.version:
                raise ValueError(f"{update.drafter}: version {update.version} <= current {current.version}")
            self._latest[update.drafter] = update
        try:
            self._pub.send_multipart([topic(update.drafter), data], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # PUB never reports Again in practice; late servers resync through the REP path

    def versions(self) -> dict[str, int]:
        with self._lock:
            return {k: u.version for k, u in self._latest.items()}

    def _answer(self, hello: Hello) -> Ack:
        with self._lock:
            latest = dict(self._latest)
        wanted = set(hello.drafters) if hello.drafters else set(latest)
        updates = [
            u for name, u in sorted(latest.items())
            if name in wanted and u.version > hello.have.get(name, 0)
        ]
        return Ack(versions={k: u.version for k, u in latest.items()}, updates=updates)

    def _serve(self) -> None:
        """The sync thread: it outlives anything a peer sends (`RepServer` answers every message); an
        unexpected error is logged, counted and survived, never the end of the sync path."""
        while not self._stop.is_set():
            try:
                self._rep.handle_one(self._answer, 100, expect=Hello)  # type: ignore[arg-type]
            except Exception:
                if self._stop.is_set():
                    return
                self.sync_errors += 1
                log.exception("weight-sync request failed; the sync path keeps serving")
                self._stop.wait(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._rep.close()
        self._pub.close(linger=0)


class WeightClient:
    """Server side: SUB to live updates plus a REQ to ask for the current ones (use from one thread)."""

    def __init__(
        self,
        ctx: zmq.Context,
        pub_endpoint: str,
        sync_endpoint: str,
        drafters: Iterable[str],
        keys: CurveKeys | None = None,
        hwm: int = 4,
        limits: WireLimits = DEFAULT_LIMITS,
        timeout_ms: int = 2000,
    ) -> None:
        self.limits = limits
        self.drafters = list(drafters)
        self._sub = _socket(ctx, zmq.SUB, limits)
        self._sub.rcvhwm = hwm
        try:
            connect(self._sub, pub_endpoint, keys)
            for name in self.drafters:
                self._sub.setsockopt(zmq.SUBSCRIBE, topic(name))
            self._req = ReqClient(ctx, sync_endpoint, keys, limits, timeout_ms)
        except BaseException:
            self._sub.close(linger=0)
            raise
        self.rejected: collections.Counter[str] = collections.Counter()

    def sync(self, server_id: str, have: dict[str, int], timeout_ms: int | None = None) -> Ack:
        """Ask the sidecar for every update newer than `have`; TransportTimeout if it does not answer."""
        return self._req.request(Hello(server_id=server_id, drafters=self.drafters, have=have), Ack, timeout_ms)

    def recv(self, timeout_ms: int) -> WeightUpdate | None:
        """The next valid published update, or None after `timeout_ms`."""
        deadline = _Deadline(timeout_ms)
        while True:
            if not self._sub.poll(deadline.left_ms(), zmq.POLLIN):
                return None
            frames = self._sub.recv_multipart(zmq.NOBLOCK)
            try:
                if len(frames) != 2:
                    raise WireError(MALFORMED, f"{len(frames)} frames, expected 2")
                update = decode(frames[1], self.limits, expect=WeightUpdate)
                if topic(update.drafter) != frames[0]:
                    raise WireError(INVALID, "topic does not match the update's drafter")
                return update
            except WireError as exc:
                self.rejected[exc.reason] += 1
            if deadline.left_ms() <= 0:
                return None

    def close(self) -> None:
        self._req.close()
        self._sub.close(linger=0)


# -- facade -----------------------------------------------------------------------------------------------------


class Transport:
    """Builds every endpoint from TransportSettings over one context; `close()` tears it all down."""

    def __init__(self, settings: TransportSettings | None = None, context: zmq.Context | None = None) -> None:
        self.settings = settings or TransportSettings()
        try:
            self.keys = self.settings.curve_keys()
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot load CURVE keys: {exc}") from None
        self.limits = self.settings.wire_limits()
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()

    def log_pusher(self) -> LogPusher:
        s = self.settings
        return LogPusher(self.ctx, s.endpoint("logs"), self.keys, s.logs_sndhwm)

    def log_puller(self) -> LogPuller:
        s = self.settings
        return LogPuller(self.ctx, s.endpoint("logs"), self.keys, s.logs_rcvhwm, self.limits)

    def weight_publisher(self) -> WeightPublisher:
        s = self.settings
        return WeightPublisher(self.ctx, s.endpoint("weights"), s.endpoint("sync"), self.keys, s.weights_hwm, self.limits)

    def weight_client(self, drafters: Iterable[str]) -> WeightClient:
        s = self.settings
        return WeightClient(
            self.ctx, s.endpoint("weights"), s.endpoint("sync"), drafters, self.keys, s.weights_hwm,
            self.limits, s.request_timeout_ms,
        )

    def admin_server(self) -> AdminServer:
        return AdminServer(self.ctx, self.settings.endpoint("admin"), self.keys, self.limits)

    def admin_client(self) -> AdminClient:
        s = self.settings
        return AdminClient(self.ctx, s.endpoint("admin"), self.keys, self.limits, s.request_timeout_ms)

    def close(self) -> None:
        stop_authenticators(self.ctx)
        if self._own_ctx:
            self.ctx.destroy(linger=0)

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Deadline:
    """Milliseconds left of a timeout spanning several polls."""

    def __init__(self, total_ms: int) -> None:
        self.total_ms = total_ms
        self._end = time.monotonic() + total_ms / 1000.0

    def left_ms(self) -> int:
        return max(0, int((self._end - time.monotonic()) * 1000))
