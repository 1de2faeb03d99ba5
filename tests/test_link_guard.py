"""Sidecar liveness -> drafter availability: the controller falls back to static while the sidecar is silent."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from adaspec.core.bench.controller import SyntheticLoad
from adaspec.core.controller import AtlasPolicy, ControllerSettings
from adaspec.core.online.guard import LinkGuard
from test_controller import STATIC_ADAPTIVE, run, state


class FakeSubscriber:
    """Only what LinkGuard reads: the time of the last answer."""

    def __init__(self) -> None:
        self.last_contact: float | None = None

    def link_up(self, timeout_s: float, now: float | None = None) -> bool:
        from adaspec.core.online.weights import WeightSubscriber

        return WeightSubscriber.link_up(self, timeout_s, now)  # type: ignore[arg-type]


def _trusted_adaptive_policy() -> tuple[SyntheticLoad, AtlasPolicy]:
    load = SyntheticLoad(STATIC_ADAPTIVE, batch=8, seed=7)
    policy = AtlasPolicy(["static", "adaptive"],
                         ControllerSettings(explore_every=4, guard_min_evidence=50))
    run(load, policy, 150)
    assert policy.trusted == [True, True]
    return load, policy


def test_policy_falls_back_to_static_while_the_sidecar_is_silent_and_returns_after():
    load, policy = _trusted_adaptive_policy()
    sub = FakeSubscriber()
    registry = CollectorRegistry()
    guard = LinkGuard(sub, ["adaptive"], timeout_s=5.0, server_id="s0", registry=registry).attach(policy)
    now = 1000.0
    sub.last_contact = now - 1.0
    assert guard.check(now) is True
    recs = run(load, policy, 20)
    assert sum(r.drafter == "adaptive" for r in recs) >= 0.8 * len(recs)
    # silence past the timeout: no adaptive drafts at all (not even exploration), static carries the batch
    assert guard.check(now + 6.0) is False
    assert registry.get_sample_value("adaspec_sidecar_link_up", {"server": "s0"}) == 0.0
    recs = run(load, policy, 40)
    assert not any(r.drafter == "adaptive" for r in recs)
    assert sum(r.drafter == "static" for r in recs) >= 0.9 * len(recs)
    # it answers again: the adaptive drafter (its statistics kept) is back at once
    sub.last_contact = now + 7.0
    assert guard.check(now + 7.5) is True
    recs = run(load, policy, 20)
    assert sum(r.drafter == "adaptive" for r in recs) >= 0.8 * len(recs)
    assert [up for _, up in guard.transitions] == [True, False, True]


def test_never_heard_from_means_unavailable_and_listeners_cannot_break_serving():
    sub = FakeSubscriber()
    policy = AtlasPolicy(["static", "adaptive"], ControllerSettings(explore_every=1, guard_min_evidence=0))
    guard = LinkGuard(sub, ["adaptive"], timeout_s=5.0, registry=CollectorRegistry())
    guard.listeners.append(lambda name, up: 1 / 0)
    guard.attach(policy)
    assert guard.check() is False and policy.available == [True, False]
    recs = run(SyntheticLoad(STATIC_ADAPTIVE, batch=4, seed=1), policy, 30)
    assert not any(r.drafter == "adaptive" for r in recs)
    sub.last_contact = time.monotonic()
    assert guard.check() is True and policy.available == [True, True]


def test_an_unguarded_drafter_comes_back_when_available_again():
    policy = AtlasPolicy(["static", "suffix"], ControllerSettings(guarded=(), explore_every=0))
    policy.set_available("suffix", False)
    policy.plan([state("r0")])
    assert policy.trusted == [True, False]
    policy.set_available("suffix", True)
    policy.plan([state("r0")])
    assert policy.trusted == [True, True]


def test_policies_without_availability_are_left_alone():
    from adaspec.core.step import FixedPolicy, Plan
    guard = LinkGuard(FakeSubscriber(), ["adaptive"], 1.0, registry=CollectorRegistry())
    policy = FixedPolicy("adaptive", 3)
    guard.attach(policy)
    assert guard.check() is False
    assert policy.plan([object()]) == [Plan("adaptive", 3)]  # a fixed policy keeps its plan: nothing to choose
