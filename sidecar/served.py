"""What the servers report about the weights they serve: acceptance per version, tau per tenant, swaps.

Every logged step of the trained drafter carries the weight version it drafted with, so acceptance
(accepted / drafted tokens) is measured per version over its most recent `window` drafted tokens. The
rollback rule compares the serving version with the one it replaced once both have `min_drafted` tokens
from `min_requests` distinct requests.
Tau per tenant and version (tokens emitted per target forward in steps of this drafter) is the trend the
admin status shows.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from adaspec.core.online.wire import StepEntry


@dataclass
class VersionStats:
    """Sliding-window acceptance of one weight version (window in drafted tokens) plus lifetime totals."""

    window: int
    drafted: int = 0
    accepted: int = 0
    total_drafted: int = 0
    total_accepted: int = 0
    _recent: collections.deque = field(default_factory=collections.deque, repr=False)
    _requests: collections.Counter = field(default_factory=collections.Counter, repr=False)

    def add(self, drafted: int, accepted: int, request: tuple[str, str] = ("", "")) -> None:
        self._recent.append((drafted, accepted, request))
        self._requests[request] += 1
        self.drafted += drafted
        self.accepted += accepted
        self.total_drafted += drafted
        self.total_accepted += accepted
        while self._recent and self.drafted - self._recent[0][0] >= self.window:
            d, a, r = self._recent.popleft()
            self.drafted -= d
            self.accepted -= a
            self._requests[r] -= 1
            if not self._requests[r]:
                del self._requests[r]

    @property
    def requests(self) -> int:
        """Distinct (server, request) pairs in the window: how many requests the acceptance rests on."""
        return len(self._requests)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class TenantVersion:
    forwards: int = 0
    emitted: int = 0

    @property
    def tau(self) -> float:
        return self.emitted / self.forwards if self.forwards else 0.0


class ServedStats:
    """Acceptance per version, tau per (tenant, version), last version seen per server -- all bounded."""

    def __init__(self, drafter: str, window: int = 4096, max_versions: int = 64, max_tenants: int = 64,
                 trend_len: int = 8) -> None:
        self.drafter, self.window = drafter, window
        self.max_versions, self.max_tenants, self.trend_len = max_versions, max_tenants, trend_len
        self.versions: collections.OrderedDict[int, VersionStats] = collections.OrderedDict()
        self.tenants: collections.OrderedDict[str, collections.OrderedDict[int, TenantVersion]] = (
            collections.OrderedDict()
        )
        self.servers: dict[str, tuple[int, float]] = {}  # server -> (weight version seen, when)

    def add(self, server_id: str, entries: list[StepEntry]) -> None:
        for e in entries:
            if e.drafter != self.drafter or e.prefill:
                continue
            v = e.weight_version
            if e.drafted:
                vs = self.versions.get(v)
                if vs is None:
                    vs = self.versions[v] = VersionStats(self.window)
                    while len(self.versions) > self.max_versions:
                        self.versions.popitem(last=False)
                vs.add(e.drafted, e.accepted, (server_id, e.request_id))
            trend = self.tenants.get(e.tenant)
            if trend is None:
                trend = self.tenants[e.tenant] = collections.OrderedDict()
                while len(self.tenants) > self.max_tenants:
                    self.tenants.popitem(last=False)
            self.tenants.move_to_end(e.tenant)
            tv = trend.get(v)
            if tv is None:
                tv = trend[v] = TenantVersion()
                while len(trend) > self.trend_len:
                    trend.popitem(last=False)
            tv.forwards += 1
            tv.emitted += e.emitted
            self.servers[server_id] = (v, time.time())

    def forget_server(self, server_id: str) -> None:
        self.servers.pop(server_id, None)

    def acceptance(self, version: int) -> tuple[float, int]:
        """(acceptance over the window, drafted tokens in it) of a version; (0.0, 0) if never served."""
        vs = self.versions.get(version)
        return (vs.acceptance, vs.drafted) if vs is not None else (0.0, 0)

    def rollback_reason(self, current: int, previous: int, min_drafted: int, margin: float,
                        min_requests: int = 1) -> str | None:
        """Why `current` should be rolled back to `previous`, or None (not enough evidence or not worse).

        Evidence is drafted tokens from at least `min_requests` distinct requests per version (D18: one forged
        batch -- one request's worth of entries -- forced a rollback; now it cannot carry the decision alone)."""
        cur, n_cur = self.acceptance(current)
        prev, n_prev = self.acceptance(previous)
        if n_cur < min_drafted or n_prev < min_drafted:
            return None
        if min(self.versions[current].requests, self.versions[previous].requests) < min_requests:
            return None
        if cur < prev * (1.0 - margin):
            return (f"served acceptance of v{current} {cur:.3f} < v{previous} {prev:.3f} x (1 - {margin:g}) "
                    f"over {n_cur}/{n_prev} drafted tokens")
        return None

    def forget(self, version: int) -> None:
        self.versions.pop(version, None)
