"""The engine thread of a server: one `Session` stepping continuously while requests come and go.

HTTP handlers run on an asyncio loop; the engine is synchronous and owns its batch, so the two meet through
queues: `submit` and `cancel` post to an inbox the engine thread drains between steps (a request joins the
running batch at the next step; nobody waits for another request to finish), and after every step each
request's new tokens go back to its handler through a callback (thread-safe: the handler's loop is woken with
`call_soon_threadsafe`). The waiting queue is bounded: past `max_waiting` a request is refused at once
(`Overloaded`), never queued without bound. An engine error fails the requests in flight, not the server.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from adaspec.core.engine.engine import GenerationResult, RequestSpec, RequestState, SpecEngine
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.errors import AdaspecError, RequestError
from adaspec.core.step import PolicyBase

log = logging.getLogger(__name__)


class Overloaded(AdaspecError):
    """Too many requests are waiting for the engine (the server answers 503 and the client retries)."""


@dataclass
class Progress:
    """What one step did for one request: its new tokens, and the outcome once it finished."""

    tokens: list[int]
    finish_reason: str | None = None  # stop | length | context | cancelled | error
    result: GenerationResult | None = None
    error: str | None = None


Emit = Callable[[Progress], None]


class ServingLoop:
    """Runs `engine` under `policy` on a daemon thread; thread-safe `submit` / `cancel`."""

    def __init__(self, engine: SpecEngine, policy: PolicyBase, max_waiting: int = 64,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        """`on_step(running, waiting)` is called after every step (metrics)."""
        self.engine, self.policy, self.max_waiting = engine, policy, max_waiting
        self.on_step = on_step
        self.session = engine.session(policy)
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[str, tuple[RequestState, Emit, int]] = {}  # id -> (state, emit, tokens sent)
        self._waiting = 0  # submitted, not yet admitted to the batch (inbox + session queue)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors = 0
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="adaspec-engine", daemon=True)

    def start(self) -> "ServingLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return len(self.session.running)

    # -- any thread -----------------------------------------------------------------------------------------
    def submit(self, spec: RequestSpec, params: SamplingParams, emit: Emit) -> None:
        """Queue a request; RequestError for a prompt the model cannot take, Overloaded when too many wait."""
        if not spec.prompt:
            raise RequestError("empty prompt")
        ctx = self.engine.target.context_len
        if len(spec.prompt) >= ctx:
            raise RequestError(f"prompt is {len(spec.prompt)} tokens; the model's context is {ctx} tokens "
                               "(at least one token must be left to generate)")
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise Overloaded(f"{self._waiting} requests are already waiting; retry shortly")
            self._waiting += 1
        self._inbox.put(("add", spec, params, emit))

    def cancel(self, request_id: str) -> None:
        """Stop a request (its client went away); its emit gets a final `cancelled` progress."""
        self._inbox.put(("cancel", request_id))

    # -- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=self.session.idle)
            if self._stop.is_set():
                break
            queued = len(self.session.queue)
            try:
                if not self.session.step():
                    continue
            except Exception as exc:  # a bug or a fault must cost the requests in flight, never the server
                self.errors += 1
                log.exception("engine step failed; failing %d requests", len(self._live))
                self._fail_all(f"{type(exc).__name__}: {exc}")
                continue
            self.steps += 1
            admitted = queued - len(self.session.queue)
            if admitted:
                with self._lock:
                    self._waiting -= admitted
            self._publish()
            if self.on_step is not None:
                self.on_step(len(self.session.running), self._waiting)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if item[0] == "add":
                _, spec, params, emit = item
                try:
                    st = self.session.add(spec, params)
                except Exception as exc:  # validated in submit; anything else is reported, not raised
                    with self._lock:
                        self._waiting -= 1
                    emit(Progress([], "error", error=f"{type(exc).__name__}: {exc}"))
                    continue
                self._live[st.request_id] = (st, emit, 0)
            else:
                rid = item[1]
                queued = any(q.request_id == rid for q in self.session.queue)
                st = self.session.cancel(rid)  # a running one leaves at the end of the next step
                if st is not None and queued:
                    with self._lock:
                        self._waiting -= 1
                    if rid in self._live:
                        self._finish(rid)

    def _publish(self) -> None:
        running = {id(st) for st in self.session.running}
        for rid, (st, emit, sent) in list(self._live.items()):
            new = st.output[sent:]
            if st.finish_reason is not None and id(st) not in running:
                self._finish(rid)
            elif new:
                self._live[rid] = (st, emit, len(st.output))
                emit(Progress(list(new)))

    def _finish(self, rid: str) -> None:
        st, emit, sent = self._live.pop(rid)
        if not st.finished:
            st.finished = time.perf_counter()
        emit(Progress(list(st.output[sent:]), st.finish_reason or "length", result=self.engine.result(st)))

    def _fail_all(self, error: str) -> None:
        for rid, (st, emit, _) in list(self._live.items()):
            emit(Progress([], "error", error=error))
        self._live.clear()
        with self._lock:
            self._waiting = 0
        self.session = self.engine.session(self.policy)  # a fresh batch: the old one's state is suspect
