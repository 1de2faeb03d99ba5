"""The sidecar's share of the machine: a CPU token bucket, and -- for a sidecar that shares the servers' cores --
a share that follows what its drafter earns on them.

Why earnings: on a co-located machine the learner is not free. Measured on the 2-core CPU the benchmarks run
on, a learner at 0.23 of a core made the target's forward 1.72x slower (prefill 2x); at 0.01 of a core the
forward ran as fast as without it. A learner whose drafter supplies none of the served tokens is pure tax, so
its share is the small `unearned_tax`; as its drafter's accepted tokens become a share `e` of what the
servers emit (an upper bound on the share of target forwards it saves), the learner may cost up to `e / 2` of
serving time -- half of what its drafter saves -- converted to cores by the measured slowdown per core.
"""

from __future__ import annotations

import collections
import time
from typing import Iterable

from adaspec.core.online.wire import StepEntry


class CpuBudget:
    """A token bucket of CPU seconds refilled at `share` cores and spent by the whole process's CPU time
    (training, gating, sockets), holding at most `burst_s` seconds' worth, so the sidecar averages at most
    `share` of a core and never bursts long enough to starve serving. `share` may change at any time."""

    def __init__(self, share: float, burst_s: float = 2.0) -> None:
        self.burst_s = burst_s
        self.share = share
        self.tokens = self.cap
        self._wall, self._cpu = time.monotonic(), time.process_time()

    @property
    def cap(self) -> float:
        return self.share * self.burst_s

    def available(self) -> bool:
        wall, cpu = time.monotonic(), time.process_time()
        self.tokens = min(self.cap, self.tokens + self.share * (wall - self._wall) - (cpu - self._cpu))
        self._wall, self._cpu = wall, cpu
        return self.tokens > 0.0


class EarnedShare:
    """The share of the servers' emitted decode tokens that `drafter`'s accepted draft tokens supplied, over
    the most recent `window` emitted tokens (all drafters' steps count; prefills do not)."""

    def __init__(self, drafter: str, window: int = 4096) -> None:
        self.drafter, self.window = drafter, window
        self._recent: collections.deque[tuple[int, int]] = collections.deque()  # (emitted, earned) per entry
        self.emitted = 0
        self.earned = 0

    def add(self, entries: Iterable[StepEntry]) -> None:
        for e in entries:
            if e.prefill or not e.emitted:
                continue
            earned = e.accepted if e.drafter == self.drafter else 0
            self._recent.append((e.emitted, earned))
            self.emitted += e.emitted
            self.earned += earned
            while self._recent and self.emitted - self._recent[0][0] >= self.window:
                n, a = self._recent.popleft()
                self.emitted -= n
                self.earned -= a

    @property
    def fraction(self) -> float:
        return self.earned / self.emitted if self.emitted else 0.0


def earned_cores(earned_fraction: float, tax_per_core: float, unearned_tax: float, cap: float) -> float:
    """Cores a co-located learner may take: the serving slowdown it may cause (`unearned_tax` while its drafter
    earns nothing, up to half its drafter's share of the emitted tokens), divided by the slowdown one core of
    learner causes (`tax_per_core`), at most `cap`."""
    return min(cap, max(unearned_tax, earned_fraction / 2.0) / tax_per_core)
