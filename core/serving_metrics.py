"""Engine-side Prometheus series: per-drafter acceptance and tau, controller choices, lookahead, swap pause.

`EngineMetrics` is a `SpecEngine.step_listeners` entry (cheap counter increments, never raises). Ratios are
left to PromQL over counters -- acceptance = rate(accepted)/rate(drafted), tau = rate(emitted)/rate(forwards)
-- which stays exact under any scrape interval. Log drops and weight versions come from `LogMetrics` /
`WeightMetrics` on the same registry. `serve_metrics` exposes a registry on /metrics (port 0 = off).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger(__name__)

#: Lookahead buckets (k is an int; le=k+0.5 puts each k in its own bucket up to 16).
K_BUCKETS = tuple(k + 0.5 for k in range(0, 17)) + (32.5, 64.5)
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class EngineMetrics:
    """Counters per drafter ('none' when the policy chose plain decoding) fed from StepRecords."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.forwards = Counter("adaspec_engine_forwards", "Request-steps (one target forward each), by drafter.",
                                ["drafter"], registry=registry)
        self.drafted = Counter("adaspec_engine_drafted_tokens", "Draft tokens verified, by drafter.", ["drafter"],
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

    def __call__(self, records: Sequence[Any]) -> None:
        try:
            for r in records:
                name = r.drafter or "none"
                self.forwards.labels(name).inc()
                self.emitted.labels(name).inc(r.emitted)
                if r.drafter:
                    self.drafted.labels(name).inc(r.drafted)
                    self.accepted.labels(name).inc(r.accepted)
                    self.lookahead.labels(name).observe(r.k)
        except Exception:  # metrics must never break serving
            log.debug("engine metrics failed", exc_info=True)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
    """Serve `registry` on http://host:port/metrics in a daemon thread; returns the server (None if port 0)."""
    if port == 0:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
