"""Server-side Prometheus series, one module for every engine (reference and SGLang) and one dashboard.

`EngineMetrics` (per-drafter acceptance and tau, lookahead, swap pause) is a `SpecEngine.step_listeners`
entry (cheap counter increments, never raises). Ratios are left to PromQL over counters -- acceptance =
rate(accepted)/rate(drafted), tau = rate(emitted)/rate(forwards) -- which stays exact under any scrape
interval. `LogMetrics` counts the log path to the sidecar, `WeightMetrics` the weight path back (staged,
applied, rejected by reason, the version in use, the sidecar link). A metric name can be registered once per
registry, so each series set is made once per registry by `per_registry`. `serve_metrics` exposes a registry
on /metrics (port 0 = off).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

#: Default registry (pass your own to export elsewhere, e.g. one per server in tests).
REGISTRY = CollectorRegistry(auto_describe=True)

#: Lookahead buckets (k is an int; le=k+0.5 puts each k in its own bucket up to 16).
K_BUCKETS = tuple(k + 0.5 for k in range(0, 17)) + (32.5, 64.5)
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5, 256.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineMetrics:
    """Counters per drafter ('none' when the policy chose plain decoding) fed from StepRecords."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.forwards = Counter("adaspec_engine_forwards", "Request-steps (one target forward each), by drafter.",
                                ["drafter"], registry=registry)
        self.drafted = Counter("adaspec_engine_draft_tokens", "Draft tokens verified, by drafter.", ["drafter"],
                               registry=registry)
        self.accepted = Counter("adaspec_engine_accepted_tokens", "Draft tokens accepted, by drafter.", ["drafter"],
                                registry=registry)
        self.emitted = Counter("adaspec_engine_emitted_tokens", "Tokens emitted, by drafter of the step.",
                               ["drafter"], registry=registry)
        self.lookahead = Histogram("adaspec_engine_lookahead", "Lookahead k chosen by the policy, by drafter.",
                                   ["drafter"], buckets=K_BUCKETS, registry=registry)
        self.swap_pause = Histogram("adaspec_engine_swap_pause_seconds",
                                    "Serving pause of each weight swap between steps.", ["drafter"],
                                    buckets=PAUSE_BUCKETS, registry=registry)
        self.batch_size = Histogram("adaspec_engine_batch_size", "Requests in each target forward.",
                                    buckets=BATCH_BUCKETS, registry=registry)

    def __call__(self, records: Sequence[Any]) -> None:
        """One step's records, summed per drafter first: a counter update costs a lock (and, under SGLang's
        multiprocess mode, a write to a mmapped file), so a step pays per drafter, not per request."""
        try:
            if not records:
                return
            self.batch_size.observe(records[0].batch_size)
            sums: dict[str | None, list[int]] = {}  # drafter (None: plain) -> [forwards, emitted, drafted, accepted]
            for r in records:
                s = sums.get(r.drafter)
                if s is None:
                    s = sums[r.drafter] = [0, 0, 0, 0]
                s[0] += 1
                s[1] += r.emitted
                if r.drafter:
                    s[2] += r.drafted
                    s[3] += r.accepted
                    self.lookahead.labels(r.drafter).observe(r.k)
            for drafter, (n, emitted, drafted, accepted) in sums.items():
                name = drafter or "none"
                self.forwards.labels(name).inc(n)
                self.emitted.labels(name).inc(emitted)
                if drafter:
                    self.drafted.labels(name).inc(drafted)
                    self.accepted.labels(name).inc(accepted)
        except Exception:  # metrics must never break serving
            log.debug("engine metrics failed", exc_info=True)


class WeightMetrics:
    """Prometheus series of the weight path; one instance per registry (metric names are unique there)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "adaspec_weight_updates_rejected", "Weight updates refused, by reason.", ["drafter", "reason"],
            registry=registry,
        )
        self.staged = Counter("adaspec_weight_updates_staged", "Weight updates validated and staged.", ["drafter"],
                              registry=registry)
        self.applied = Counter("adaspec_weight_updates_applied", "Weight updates swapped in.", ["drafter"],
                               registry=registry)
        self.version = Gauge("adaspec_drafter_weights_version", "Weight version in use.", ["drafter"],
                             registry=registry)
        self.pause = Gauge("adaspec_weight_swap_pause_seconds", "Serving pause of the last swap.", ["drafter"],
                           registry=registry)
        self.link_up = Gauge("adaspec_sidecar_link_up",
                             "1 while the sidecar answers and the online-learned drafters may be used.", ["server"],
                             registry=registry)


class LogMetrics:
    """Prometheus series of the log path (one instance per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches_sent = Counter("adaspec_log_batches_sent", "Log batches queued to the sidecar.", ["server"],
                                    registry=registry)
        self.entries_sent = Counter("adaspec_log_entries_sent", "Step entries queued to the sidecar.", ["server"],
                                    registry=registry)
        self.batches_dropped = Counter(
            "adaspec_log_batches_dropped", "Log batches dropped (queue full, too large).", ["server", "reason"],
            registry=registry,
        )
        self.entries_dropped = Counter(
            "adaspec_log_entries_dropped", "Step entries dropped, by reason.", ["server", "reason"],
            registry=registry,
        )
        self.errors = Counter("adaspec_log_publisher_errors", "Unexpected errors swallowed by the publisher.",
                              ["server"], registry=registry)


class ServeMetrics:
    """The HTTP side of `adaspec serve`: requests by endpoint and status, latency, time to first token,
    generated tokens, and the engine's running / waiting requests."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("adaspec_http_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("adaspec_http_request_seconds", "Request latency (to the last byte), by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("adaspec_http_time_to_first_token_seconds", "Time to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("adaspec_http_generated_tokens", "Completion tokens returned to clients.",
                              registry=registry)
        self.running = Gauge("adaspec_engine_running_requests", "Requests in the engine's batch.", registry=registry)
        self.waiting = Gauge("adaspec_engine_waiting_requests", "Requests waiting for a batch slot.",
                             registry=registry)


_metrics_lock = threading.Lock()
_metrics: dict[tuple[int, type], tuple[CollectorRegistry, object]] = {}
T = TypeVar("T")


def per_registry(cls: Callable[[CollectorRegistry], T], registry: CollectorRegistry | None = None) -> T:
    """One `cls(registry)` per registry (REGISTRY by default): a metric name can be registered only once."""
    registry = REGISTRY if registry is None else registry
    key = (id(registry), cls)  # type: ignore[arg-type]
    with _metrics_lock:
        hit = _metrics.get(key)
        if hit is None:
            hit = (registry, cls(registry))
            _metrics[key] = hit
        return hit[1]  # type: ignore[return-value]


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
    """Serve `registry` on http://host:port/metrics in a daemon thread; returns the server (None if port 0)."""
    if port == 0:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
