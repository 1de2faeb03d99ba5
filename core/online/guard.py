"""Fall back to the static head while the sidecar is silent.

An online-learned drafter is only as safe as the process watching it: the sidecar's evaluation gate and
rollback are what keep a bad version out of service. When the sidecar stops answering (crashed, killed,
partitioned), the server keeps the weights it has -- serving never waits -- but stops drafting with them:
`LinkGuard.check()`, called between steps, tells the policy the learned drafters are unavailable, and the
controller's remaining candidates (the static head first) take over. When the sidecar answers again (the
subscriber's periodic sync is the heartbeat) and the server has its current version, they come back.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from prometheus_client import CollectorRegistry

from adaspec.core.metrics import WeightMetrics, per_registry
from adaspec.core.online.weights import WeightSubscriber
from adaspec.core.step import PolicyBase

log = logging.getLogger(__name__)

Listener = Callable[[str, bool], Any]


class LinkGuard:
    """Turns sidecar liveness into drafter availability, on transitions only (cheap enough for every step)."""

    def __init__(
        self,
        subscriber: WeightSubscriber,
        drafters: Sequence[str],
        timeout_s: float,
        server_id: str = "server-0",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.subscriber, self.drafters, self.timeout_s = subscriber, list(drafters), timeout_s
        self.server_id = server_id
        self.listeners: list[Listener] = []
        self.up: bool | None = None
        #: (time.monotonic(), up) of every transition, oldest first.
        self.transitions: list[tuple[float, bool]] = []
        self._gauge = per_registry(WeightMetrics, registry).link_up.labels(server_id)

    def attach(self, policy: PolicyBase) -> "LinkGuard":
        """Forward availability to `policy.set_available(drafter, available)` (a no-op for policies that do not
        choose drafters: they keep their plans) and apply the current state at once."""
        self.listeners.append(policy.set_available)
        if self.up is not None:
            for name in self.drafters:
                policy.set_available(name, self.up)
        return self

    def check(self, now: float | None = None) -> bool:
        """Re-evaluate liveness; notify listeners when it changed. Never raises into the serving loop."""
        up = self.subscriber.link_up(self.timeout_s, now)
        if up != self.up:
            self.up = up
            self.transitions.append((time.monotonic() if now is None else now, up))
            self._gauge.set(1.0 if up else 0.0)
            if up:
                log.info("sidecar answering: online drafters %s back in service", self.drafters)
            else:
                log.warning("sidecar silent for %.1f s: falling back from %s", self.timeout_s, self.drafters)
            for fn in self.listeners:
                for name in self.drafters:
                    try:
                        fn(name, up)
                    except Exception:  # a listener must not break serving
                        log.exception("link guard listener failed")
        return up
