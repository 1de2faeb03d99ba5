"""Runs one policy over the drift stream, replayed on traces or live, and returns per-request outcomes."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from adaspec.core.config import Settings
from adaspec.core.controller.settings import ControllerSettings
from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.drafters.static_adapted import AdaptedStaticDrafter
from adaspec.core.drafters.registry import make_drafters
from adaspec.core.controller import registry as policy_registry
from adaspec.core.drift.step_costs import StepCosts
from adaspec.core.drift.metrics import ModeledClock, RequestOutcome, outcome
from adaspec.core.drift.oracle import TraceOracle
from adaspec.core.drift.policies import TimedPolicy
from adaspec.core.drift.replay_engine import TraceEngine
from adaspec.core.drift.stream import StreamRequest
from adaspec.core.drift.traces import Trace
from adaspec.core.engine.engine import RequestSpec, SpecEngine
from adaspec.core.engine.profile import StepProfile
from adaspec.core.step import StepRecord
from adaspec.core.engine.sampling import SamplingParams

TENANT = "drift"
#: Samples trained per sample received in the benchmark's in-process sidecar (the service default is 8; a
#: sidecar is a separate process with its own cores, here it shares the benchmark's, so it trains less).
LEARN_REPLAY_RATIO = 2.0


@dataclass
class PolicyRun:
    name: str
    outcomes: list[RequestOutcome]
    controller_us: float | None = None
    learner: dict[str, Any] | None = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    sidecar: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None  # live: the engine's per-stage step profile (`StepProfile.to_json`)


class _StepClock:
    """Wall time of each engine step (between_steps -> step listener), shared evenly by its requests."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.per_request: dict[str, float] = {}

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, records: Sequence[StepRecord]) -> None:
        share = (time.perf_counter() - self.t0) / max(1, len(records))
        for r in records:
            self.per_request[r.request_id] = self.per_request.get(r.request_id, 0.0) + share


def run_policy(
    name: str, stream: Sequence[StreamRequest], prompts: Sequence[Sequence[int]], traces: Sequence[Trace] | None,
    target: Any, settings: Settings, controller: ControllerSettings, costs: StepCosts, k: int,
    batch_size: int, max_new_tokens: int, live: bool = False, learn: bool = True,
    learner_kwargs: dict[str, Any] | None = None, sidecar: bool = False, online_costs: bool | None = None,
    adapter_kwargs: dict[str, Any] | None = None,
) -> PolicyRun:
    """Fresh drafters (nothing carries over between policies), the stream in order, continuous batching.
    online_costs (default: live): the controller's cost model keeps learning from the steps it times; off, it
    decides from the start-up costs alone, as a replay does (so a live run can be compared with its replay)."""
    return run_to_end(PolicyRunner(name, stream, prompts, traces, target, settings, controller, costs, k,
                                   batch_size, max_new_tokens, live, learn, learner_kwargs, sidecar, online_costs,
                                   adapter_kwargs))


def run_to_end(runner: "PolicyRunner") -> PolicyRun:
    """Step one runner until its stream is served; finished (its sidecar closed) even when a step raises."""
    try:
        while runner.step():
            pass
    finally:
        run = runner.finish()
    return run


def run_interleaved(runners: Sequence["PolicyRunner"]) -> list[PolicyRun]:
    """Step several live policy runs in turn, always the one that has emitted the fewest tokens (outputs are
    identical, so all of them traverse the stream's phases together), so that whatever the machine does
    meanwhile -- on a shared VM one run of plain decoding can be 20-85% faster than the next -- falls on every
    policy alike instead of on whichever ran during it.

    The runs' sidecars keep running throughout (at their bounded share, at idle priority): paused while the
    others step they would miss their servers' heartbeats. So a learner's interference falls on every policy
    alike here; a sequential run (`--sequential`) charges it to its own policy alone."""
    try:
        active = list(runners)
        while active:
            r = min(active, key=lambda x: x.emitted)
            if not r.step():
                active.remove(r)
    finally:
        runs = [r.finish() for r in runners]
    return runs


class PolicyRunner:
    """One policy's run over the stream, one engine step at a time (`run_to_end` steps it to the end;
    `run_interleaved` steps several in turn)."""

    def __init__(
        self, name: str, stream: Sequence[StreamRequest], prompts: Sequence[Sequence[int]],
        traces: Sequence[Trace] | None, target: Any, settings: Settings, controller: ControllerSettings,
        costs: StepCosts, k: int, batch_size: int, max_new_tokens: int, live: bool = False, learn: bool = True,
        learner_kwargs: dict[str, Any] | None = None, sidecar: bool = False, online_costs: bool | None = None,
        adapter_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.t_start = time.perf_counter()
        self.seconds = 0.0  # wall time spent in this run's own steps and set-up
        self.name, self.stream, self.live = name, stream, live
        entry = policy_registry.entry(name)
        names = entry.drafters
        learning = learn and "adaptive" in names
        external = learning and sidecar  # a real sidecar process learns from the engine's logs
        if external and not live:
            raise ValueError("a real sidecar needs the live engine (--live)")
        s = settings.model_copy(update={"adaptive_collect": 32768 if learning and not external else 0})
        drafters = make_drafters(names, s, target)
        if live:
            # The engine verifies as the costs price it (measured ones were fitted on this engine's mode).
            engine: SpecEngine = SpecEngine(target, drafters, batch_size=batch_size, ragged_verify=not costs.padded)
        else:
            engine = TraceEngine(target, drafters, costs.verify_time, batch_size=batch_size,
                                 padded_verify=costs.padded, verify_multiple=costs.multiple)
        specs = [RequestSpec(list(p), f"r{req.index}", TENANT) for req, p in zip(stream, prompts)]
        trace_by_id = {sp.request_id: tr for sp, tr in zip(specs, traces or ())}
        if (not live or entry.needs_oracle) and len(trace_by_id) != len(specs):
            raise ValueError(f"policy {name!r} {'replays' if not live else 'plans from'} recorded traces: none given")
        if isinstance(engine, TraceEngine):
            engine.traces = trace_by_id
        oracle = TraceOracle(drafters, trace_by_id, controller.max_k) if entry.needs_oracle else None
        frozen = not (live if online_costs is None else online_costs)
        policy = policy_registry.make_policy(name, k=k, settings=controller, costs=costs.cost_model(frozen=frozen),
                                             oracle=oracle, prepare=None if oracle is None else oracle.prepare)
        self.timed = TimedPolicy(policy)
        self.learner: Any = None
        self.online: _SidecarLink | None = None
        adapted = learning and isinstance(drafters["adaptive"], AdaptedStaticDrafter)
        if external and adapted:
            raise ValueError("the adapter kind of adaptive drafter learns in-process only so far (--in-process)")
        if external:
            self.online = _SidecarLink(engine, drafters["adaptive"], name, learner_kwargs)
        elif adapted:
            from adaspec.sidecar.adapter_learner import AdapterLearner, AdapterLearnerSettings

            self.learner = AdapterLearner(drafters["adaptive"], AdapterLearnerSettings(**(adapter_kwargs or {})))
            engine.between_steps.append(self.learner.between_steps)
        elif learning:
            from adaspec.sidecar.inprocess import InProcessSidecar  # the sidecar's own pipeline, run in-process
            from adaspec.sidecar.settings import SidecarSettings

            drafter = drafters["adaptive"]
            assert isinstance(drafter, AdaptiveDrafter)
            knobs = {"replay_ratio": LEARN_REPLAY_RATIO, **(learner_kwargs or {})}
            self.learner = InProcessSidecar(drafter, SidecarSettings(**knobs))
            engine.between_steps.append(self.learner.between_steps)
        self.clock = _StepClock()
        engine.between_steps.append(self.clock.start)
        engine.step_listeners.append(self.clock)
        self.modeled = ModeledClock(costs)
        engine.step_listeners.append(self.modeled)
        self.engine = engine
        self.session = engine.session(self.timed)
        #: live: the engine's step profile split by the phase of the oldest request in the batch
        self.phase_of = {sp.request_id: req.phase for sp, req in zip(specs, stream)}
        self.phase_profiles: dict[str, StepProfile] = {}
        self.states = [self.session.add(sp, SamplingParams(max_new_tokens=max_new_tokens), index=i)
                       for i, sp in enumerate(specs)]
        self.seconds += time.perf_counter() - self.t_start
        self._run: PolicyRun | None = None

    @property
    def emitted(self) -> int:
        """Tokens emitted so far over the whole stream (how far this run has come)."""
        return sum(len(st.output) for st in self.states)

    def step(self) -> bool:
        """One engine step; False when the stream is done."""
        t0 = time.perf_counter()
        oldest = self.session.running or self.session.queue
        phase = self.phase_of.get(oldest[0].request_id) if self.live and oldest else None
        snap = self.engine.profile.snapshot() if phase is not None else None
        try:
            return self.session.step()
        finally:
            if snap is not None:
                self.phase_profiles.setdefault(phase, StepProfile()).add_since(self.engine.profile, snap)
            self.seconds += time.perf_counter() - t0

    def finish(self) -> PolicyRun:
        """Close the sidecar link (however the run ended) and collect the outcomes (once)."""
        if self._run is not None:
            return self._run
        sidecar_info = self.online.close() if self.online is not None else None
        results = [self.engine.result(st) for st in self.states]
        outs = []
        for req, res in zip(self.stream, results):
            o = outcome(req.index, req.phase, res, self.modeled)
            if self.live:
                o = RequestOutcome(o.index, o.phase, o.tokens, o.forwards, o.modeled_s,
                                   self.clock.per_request.get(res.request_id, 0.0), o.drafter_tokens)
            outs.append(o)
        learner, name = self.learner, self.name
        self._run = PolicyRun(
            name, outs,
            controller_us=self.timed.us_per_request_step if name == "atlas" else None,
            learner=None if learner is None else {
                "updates": learner.stats.updates, "gates": learner.stats.gates,
                "published": len(learner.stats.versions), "samples": learner.stats.samples,
                "heldout_samples": learner.stats.heldout_samples, "versions": learner.stats.versions,
            },
            outputs=[r.output_tokens for r in results],
            seconds=self.seconds,
            sidecar=sidecar_info,
            profile={**self.engine.profile.to_json(),
                     "phases": {ph: pr.to_json() for ph, pr in self.phase_profiles.items()}} if self.live else None,
        )
        return self._run


class _SidecarLink:
    """A real sidecar process over IPC sockets for one policy run: logs out, weights in (`core/online`). Its
    temp dir (sockets, state, log) is removed when the run ends, however it ends."""

    def __init__(self, engine: SpecEngine, drafter: Any, name: str, knobs: dict[str, Any] | None) -> None:
        import tempfile
        from pathlib import Path

        from adaspec.core.online.attach import OnlineAdaptive
        from adaspec.core.online.settings import TransportSettings
        from adaspec.sidecar.process import spawn_sidecar

        self.tmp = Path(tempfile.mkdtemp(prefix="as-drift-", dir="/tmp"))  # IPC paths must stay short
        ts = TransportSettings(run_dir=self.tmp / "run")
        try:
            self.process = spawn_sidecar(ts, self.tmp / "state", head=drafter.head,
                                         settings={"replay_ratio": LEARN_REPLAY_RATIO, **(knobs or {})},
                                         env={"OMP_NUM_THREADS": "1"}, colocated=True)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        try:
            self.online = OnlineAdaptive(engine, drafter, ts, server_id=f"drift-{name}").start()
            self.online.wait_synced(30)
        except BaseException:
            self.process.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.cpu0, self.wall0 = self.process.cpu_seconds(), time.perf_counter()

    def close(self) -> dict[str, Any]:
        try:
            cpu, wall = self.process.cpu_seconds(), time.perf_counter() - self.wall0
            try:  # what the learner did and the share its drafter's earnings bought (sidecar/budget.py)
                st = self.process.status(timeout_ms=5000)
                learner = {k: st.get(k) for k in ("updates", "earned_fraction", "cpu_share")}
            except Exception:
                learner = {"updates": None, "earned_fraction": None, "cpu_share": None}
            info = {**{f"learner_{k}": v for k, v in learner.items()},
                    "versions_applied": self.online.versions_applied(),
                    "logs_dropped": int(self.online.logs_dropped().get("batches", 0)),
                    "sidecar_alive_at_end": self.process.alive(),
                    "cpu_s": None if cpu is None or self.cpu0 is None else cpu - self.cpu0, "wall_s": wall}
            self.online.close()
            self.process.stop()
            return info
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
