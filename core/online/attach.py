"""Engine-side online learning: wire a `SpecEngine`'s adaptive drafter to a sidecar.

`OnlineAdaptive` attaches three things to an engine, none of which can block or break a step:

* a step listener that queues every step's records (tokens, counts, weight version used, and target
  hidden states at the kept positions for layer -1 -- what the adaptive head reads) for a `BackgroundSender`
  thread, whose `LogPublisher` encodes them and ships them over a non-blocking PUSH off the serving step;
* a `WeightSubscriber` thread (sync at start, then the PUB) feeding a `WeightStager` for the drafter's head,
  which validates every update off the hot path;
* a `between_steps` hook applying a staged update by in-place copy -- so a step always drafts with one
  complete version, and the version a record reports is the one it drafted with;
* a `LinkGuard` checked in that same hook: while the sidecar has not answered for `link_timeout_s`, a policy
  attached with `guard(policy)` does not use the adaptive drafter (the controller falls back to static).
"""

from __future__ import annotations

from typing import Any

import torch
from prometheus_client import CollectorRegistry

from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.engine.engine import SpecEngine
from adaspec.core.step import PolicyBase, StepRecord
from adaspec.core.online.guard import LinkGuard
from adaspec.core.online.logs import LogPublisher
from adaspec.core.online.sender import BackgroundSender
from adaspec.core.metrics import EngineMetrics, LogMetrics, per_registry, serve_metrics
from adaspec.core.online.transport import Transport
from adaspec.core.online.settings import TransportSettings
from adaspec.core.online.weights import WeightStager, WeightSubscriber


class OnlineAdaptive:
    """Logs out, weights in, for one engine and its adaptive drafter. `start()` attaches, `close()` detaches."""

    def __init__(
        self,
        engine: SpecEngine,
        drafter: AdaptiveDrafter,
        transport: Transport | TransportSettings | None = None,
        server_id: str = "server-0",
        feature_sample_rate: float = 1.0,
        registry: CollectorRegistry | None = None,
        resync_s: float | None = None,
        poll_ms: int = 100,
        metrics_port: int = 0,
        metrics_host: str = "127.0.0.1",
        link_timeout_s: float | None = None,
        log_queue: int = 256,
    ) -> None:
        """`metrics_port` > 0 serves this registry (engine, log and weight series) on /metrics; `log_queue`
        bounds the steps waiting for the sender thread (a full queue drops a step, counted)."""
        if engine.drafters.get(drafter.name) is not drafter:
            raise ValueError(f"drafter {drafter.name!r} is not the engine's drafter of that name")
        if -1 not in engine.hidden_layers:
            raise ValueError("the engine does not compute the final hidden state the adaptive head reads")
        self.engine, self.drafter, self.server_id = engine, drafter, server_id
        self._own_transport = not isinstance(transport, Transport)
        self.transport = transport if isinstance(transport, Transport) else Transport(transport)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.metrics = per_registry(EngineMetrics, self.registry)
        self.stager = WeightStager(drafter.head, drafter.name, registry=self.registry)
        self._layer = engine.hidden_layers.index(-1)
        self.publisher = LogPublisher.from_transport(
            self.transport, server_id, feature_sample_rate=feature_sample_rate, features_of=self._features_of,
            registry=self.registry,
        )
        self._log_queue = log_queue
        self.sender: BackgroundSender | None = None
        self.subscriber = WeightSubscriber(self.transport, [self.stager], server_id, resync_s, poll_ms)
        timeout = self.transport.settings.link_timeout_s if link_timeout_s is None else link_timeout_s
        self.link = LinkGuard(self.subscriber, [drafter.name], timeout, server_id, self.registry)
        #: (engine step count before the step that first used it, version, serving pause in s) per swap.
        self.swaps: list[tuple[int, int, float]] = []
        self._hooks: list[tuple[list, Any]] = []
        self._record_features_before = engine.record_features
        self._started = False
        self._metrics_port, self._metrics_host = metrics_port, metrics_host
        self.http = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "OnlineAdaptive":
        e = self.engine
        if self.sender is None:
            self.sender = BackgroundSender(self._publish_step, self._log_queue, on_drop=self._step_dropped,
                                           name=f"adaspec-logs-{self.server_id}", flush=self.publisher.flush)
        self._hooks = [(e.between_steps, self._between), (e.step_listeners, self.sender.submit),
                       (e.step_listeners, self.metrics)]
        for hooks, fn in self._hooks:
            hooks.append(fn)
        e.record_features = True
        self.subscriber.start()
        if self._metrics_port and self.http is None:
            self.http = serve_metrics(self.registry, self._metrics_port, self._metrics_host)
        self._started = True
        return self

    def guard(self, policy: PolicyBase) -> "OnlineAdaptive":
        """Let `policy` (e.g. `AtlasPolicy`) use the adaptive drafter only while the sidecar answers; checked
        between steps."""
        self.link.attach(policy)
        return self

    def wait_synced(self, timeout: float) -> bool:
        """True once the subscriber has heard from the sidecar at least once (it keeps retrying anyway)."""
        return self.subscriber.synced.wait(timeout)

    def flush_logs(self, timeout: float = 5.0) -> bool:
        """Send every step logged so far now (tests, shutdown); False if the sender did not catch up in time."""
        caught_up = self.sender.drain(timeout) if self.sender is not None else True
        self.publisher.flush()
        return caught_up

    def close(self) -> None:
        """Detach from the engine, let the sender finish what is queued, flush (non-blocking), stop the
        subscriber."""
        if self._started:
            for hooks, fn in self._hooks:
                if fn in hooks:
                    hooks.remove(fn)
            self.engine.record_features = self._record_features_before
            self.subscriber.stop()
            self._started = False
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        self.publisher.close()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        if self._own_transport:
            self.transport.close()

    def __enter__(self) -> "OnlineAdaptive":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- hooks ----------------------------------------------------------------------------------------------
    def _between(self) -> None:
        self.link.check()
        pause = self.stager.apply_if_staged()
        if pause > 0.0:
            self.drafter.weight_version = self.stager.version  # records of the next step carry it
            self.swaps.append((self.engine.step_count, self.stager.version, pause))
            self.metrics.swap_pause.labels(self.drafter.name).observe(pause)

    def _features_of(self, rec: StepRecord) -> torch.Tensor | None:
        """Layer -1 at the positions that pair with emitted tokens (a prefill's prompt rows are not sent)."""
        f = rec.features
        return None if f is None else f[-(rec.accepted + 1):, self._layer]

    def _publish_step(self, records: list[StepRecord]) -> None:
        """Sender thread: encode and ship, then drop the hidden states (they are copied into the entries, and
        must not stay alive in the results)."""
        try:
            self.publisher(records)
        finally:
            for r in records:
                r.features = None

    def _step_dropped(self, entries: int) -> None:
        """The sender's queue was full: the step's entries are lost, counted as the publisher counts its own."""
        self.publisher.metrics.entries_dropped.labels(self.server_id, "queue_full").inc(entries)

    # -- figures --------------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.stager.version

    def versions_applied(self) -> list[int]:
        return [v for _, v, _ in self.swaps]

    def logs_dropped(self) -> dict[str, int]:
        """Batches and entries the publisher dropped (queue full, too large, invalid)."""
        m = per_registry(LogMetrics, self.registry)
        out = {"batches": 0, "entries": 0}
        for metric, key in ((m.batches_dropped, "batches"), (m.entries_dropped, "entries")):
            for fam in metric.collect():
                for sample in fam.samples:
                    if sample.name.endswith("_total") and sample.labels.get("server") == self.server_id:
                        out[key] += int(sample.value)
        return out
