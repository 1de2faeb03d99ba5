"""Acceptance logs leave the serving loop without costing it more than a queue append.

A serving loop (SGLang's scheduler thread, the reference engine's step) runs every step; encoding log
entries (pydantic validation, msgpack, hidden-state copies to the host) and the socket send must not sit on
it: on this 2-core CPU they were 1.5 ms of a ~90 ms step on the step, and run during the next forward here. `BackgroundSender.submit` puts a step's records on a bounded queue
and returns at once; a daemon thread hands them to the sink (a `LogPublisher`, itself non-blocking towards
the sidecar) and, when no step arrived for `idle_flush_s`, calls `flush()` so a partial batch leaves even
when traffic stops. A full queue drops the step, counted; a failing sink is counted and never
raises anywhere.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


class BackgroundSender:
    """Bounded queue + one daemon thread between the serving loop and a log sink."""

    def __init__(self, sink: Callable[[Sequence[Any]], Any], maxsize: int = 256,
                 on_drop: Callable[[int], None] | None = None, name: str = "adaspec-log-sender",
                 idle_flush_s: float = 0.25, flush: Callable[[], Any] | None = None) -> None:
        """`flush`: called when no step arrived for `idle_flush_s` (the sink's partial batch leaves)."""
        self.sink = sink
        self.flush = flush
        self.idle_flush_s = idle_flush_s
        self.on_drop = on_drop
        self.dropped_steps = 0
        self.sent_steps = 0
        self.errors = 0
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = object()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[Any]) -> bool:
        """Queue one step's records; False (and counted) when the queue is full. Never blocks, never raises."""
        try:
            self._q.put_nowait(records)
            return True
        except queue.Full:
            self.dropped_steps += 1
            if self.on_drop is not None:
                try:
                    self.on_drop(len(records))
                except Exception:
                    pass
            return False

    def _run(self) -> None:
        flush = self.flush
        while True:
            try:
                item = self._q.get(timeout=self.idle_flush_s)
            except queue.Empty:
                if flush is not None:
                    try:
                        flush()
                    except Exception:
                        self.errors += 1
                continue
            try:
                if item is self._stop:
                    return
                self.sink(item)
                self.sent_steps += 1
            except Exception:
                self.errors += 1
                if self.errors == 1 or self.errors % 1000 == 0:
                    log.exception("adaspec log sender: sink failed (%d so far)", self.errors)
            finally:
                self._q.task_done()

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far went to the sink (tests, shutdown); False on timeout."""
        done = threading.Event()

        def _wait() -> None:
            self._q.join()
            done.set()

        threading.Thread(target=_wait, daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after what is queued (never blocks longer than `timeout`)."""
        try:
            self._q.put(self._stop, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


class DeviceBudget:
    """Bytes of device memory that queued log features may hold: taken on the serving thread when a step's
    features are copied, given back by the sender thread once they are on the host (or the step is dropped).
    Without it a lagging sender could pin `queue length x batch x (S+1) x d x 4` bytes outside SGLang's
    memory budget (about 1.8 GB for d=4096, bs=48, S=8, 256 steps)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self.held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.held + nbytes > self.limit:
                return False
            self.held += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.held = max(0, self.held - nbytes)


class StepLogs:
    """One step's records (each carries the weight version it drafted with, stamped on the serving thread: by
    the time the sender encodes them a newer version may already be in place) and, when the records' features
    are device tensors, the event after which they are computed (the sender thread waits on it before
    copying them to the host, so the serving thread never synchronises for logs). `release()` returns the
    features' bytes to the device budget they were taken from (once: after sending, or when dropped)."""

    __slots__ = ("records", "ready", "feature_bytes", "budget")

    def __init__(self, records: Sequence[Any], ready: Any = None, feature_bytes: int = 0,
                 budget: DeviceBudget | None = None) -> None:
        self.records, self.ready = records, ready
        self.feature_bytes, self.budget = feature_bytes, budget

    def __len__(self) -> int:
        return len(self.records)

    def release(self) -> None:
        if self.budget is not None and self.feature_bytes:
            self.budget.give(self.feature_bytes)
        self.feature_bytes = 0


class PublisherSink:
    """Sender-thread adapter: waits for a step's device features, then feeds a `LogPublisher` its records."""

    def __init__(self, publisher: Any) -> None:
        self.publisher = publisher

    def __call__(self, item: Any) -> None:
        if not isinstance(item, StepLogs):
            self.publisher(item)
            return
        try:
            if item.ready is not None:
                item.ready.synchronize()
            self.publisher(item.records)  # encodes the features: host copies from here on
        finally:
            item.release()
