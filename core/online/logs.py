"""Ships engine step records to the sidecar without ever slowing or breaking the serving loop.

`LogPublisher` is a `SpecEngine.step_listeners` entry: each call turns the step's records into wire entries
(sampling target hidden-state features at `feature_sample_rate`), and once `batch_entries` are buffered or
`flush_s` has passed it sends one `LogBatch` over a non-blocking PUSH. A full queue drops the batch; every
outcome is counted, and no exception escapes into the engine.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, Sequence

import torch
from prometheus_client import CollectorRegistry

from adaspec.core.metrics import LogMetrics, per_registry
from adaspec.core.online.transport import LogPusher, Transport
from adaspec.core.step import StepRecord
from adaspec.core.online.wire import DEFAULT_LIMITS, LogBatch, StepEntry, WireError, WireLimits, encode, entry_from_record

log = logging.getLogger(__name__)


class LogPublisher:
    """Step listener that batches StepRecords into LogBatch messages and pushes them, never blocking."""

    def __init__(
        self,
        send: LogPusher | Callable[[bytes], bool],
        server_id: str,
        batch_entries: int = 64,
        flush_s: float = 0.25,
        feature_sample_rate: float = 0.0,
        features_of: Callable[[StepRecord], torch.Tensor | None] | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        registry: CollectorRegistry | None = None,
        seed: int = 0,
    ) -> None:
        """`features_of(record)`: the hidden states a sampled entry carries (default: the record's `features`);
        each entry's weight version is the record's own (the version the step drafted with)."""
        if not 0.0 <= feature_sample_rate <= 1.0:
            raise ValueError("feature_sample_rate must be in [0, 1]")
        if not 1 <= batch_entries <= limits.max_entries:
            raise ValueError(f"batch_entries must be in [1, {limits.max_entries}]")
        self.pusher = send if isinstance(send, LogPusher) else None
        self._send = send.send if isinstance(send, LogPusher) else send
        self.server_id = server_id
        self.batch_entries = batch_entries
        self.flush_s = flush_s
        self.feature_sample_rate = feature_sample_rate
        self.features_of = features_of or (lambda rec: rec.features)
        self.limits = limits
        self.metrics = per_registry(LogMetrics, registry)
        self.seq = 0
        self._rng = random.Random(seed)
        self._buffer: list[StepEntry] = []
        self._last_flush = time.monotonic()
        self._last_error_log = 0.0
        #: One caller at a time: a sender thread calls it, and a flush may come from any thread.
        self._lock = threading.RLock()

    @classmethod
    def from_transport(cls, transport: Transport, server_id: str, **kwargs: Any) -> "LogPublisher":
        """A publisher over a fresh PUSH socket, batch size, flush interval and sample rate from settings."""
        s = transport.settings
        kwargs.setdefault("batch_entries", min(s.log_batch_entries, transport.limits.max_entries))
        kwargs.setdefault("flush_s", s.log_flush_s)
        kwargs.setdefault("feature_sample_rate", s.feature_sample_rate)
        kwargs.setdefault("limits", transport.limits)
        return cls(transport.log_pusher(), server_id, **kwargs)

    def __call__(self, records: Sequence[StepRecord]) -> None:
        with self._lock:
            self._publish(records)

    def _publish(self, records: Sequence[StepRecord]) -> None:
        try:
            for rec in records:
                entry = self._entry(rec)
                if entry is not None:
                    self._buffer.append(entry)
                if len(self._buffer) >= self.batch_entries:
                    self._flush()
            if self._buffer and time.monotonic() - self._last_flush >= self.flush_s:
                self._flush()
        except Exception:
            self._swallow("step listener")

    def _entry(self, rec: StepRecord) -> StepEntry | None:
        try:
            features = None
            if self.feature_sample_rate and self._rng.random() < self.feature_sample_rate:
                features = self.features_of(rec)
            entry = entry_from_record(rec, features=features)
            if entry.features is not None and len(entry.features.data) > self.limits.max_tensor_bytes:
                entry = entry.model_copy(update={"features": None})
                self.metrics.entries_dropped.labels(self.server_id, "features_too_large").inc()
            return entry
        except Exception as exc:  # a record the schema refuses (e.g. an odd drafter) is dropped, not fatal
            self.metrics.entries_dropped.labels(self.server_id, "invalid").inc()
            self._log_limited(f"dropping an invalid step record: {exc}")
            return None

    def flush(self) -> bool:
        """Send buffered entries now as one batch; False if there was nothing to send or it was dropped."""
        with self._lock:
            return self._flush()

    def _flush(self) -> bool:
        try:
            self._last_flush = time.monotonic()
            if not self._buffer:
                return False
            entries, self._buffer = self._buffer, []
            batch = LogBatch(server_id=self.server_id, seq=self.seq, entries=entries)
            self.seq += 1  # counts attempts, so the sidecar sees drops as gaps
            try:
                data = encode(batch, self.limits)
            except WireError as exc:
                return self._dropped(len(entries), exc.reason)
            if not self._send(data):
                return self._dropped(len(entries), "queue_full")
            self.metrics.batches_sent.labels(self.server_id).inc()
            self.metrics.entries_sent.labels(self.server_id).inc(len(entries))
            return True
        except Exception:
            self._swallow("flush")
            return False

    def close(self) -> None:
        """Flush what is buffered (still non-blocking) and close the PUSH socket if we were given one."""
        self.flush()
        if self.pusher is not None:
            self.pusher.close()

    def _dropped(self, n: int, reason: str) -> bool:
        self.metrics.batches_dropped.labels(self.server_id, reason).inc()
        self.metrics.entries_dropped.labels(self.server_id, reason).inc(n)
        return False

    def _swallow(self, where: str) -> None:
        self._buffer = []
        try:
            self.metrics.errors.labels(self.server_id).inc()
            self._log_limited(f"log publisher {where} failed", exc_info=True)
        except Exception:
            pass

    def _log_limited(self, msg: str, exc_info: bool = False) -> None:
        """At most one log line every 10 s: a broken sidecar must not flood the serving logs."""
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:
            self._last_error_log = now
            log.warning(msg, exc_info=exc_info)
