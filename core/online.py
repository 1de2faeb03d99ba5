"""Engine-side online learning: wire a `SpecEngine`'s adaptive drafter to a sidecar, and spawn sidecars.

`OnlineAdaptive` attaches three things to an engine, none of which can block or break a step:

* a `LogPublisher` step listener shipping every step (tokens, counts, weight version used, and target
  hidden states at the kept positions for layer -1 -- what the adaptive head reads) over a non-blocking PUSH;
* a `WeightSubscriber` thread (sync at start, then the PUB) feeding a `WeightStager` for the drafter's head,
  which validates every update off the hot path;
* a `between_steps` hook applying a staged update by in-place copy -- so a step always drafts with one
  complete version, and the version a record reports is the one it drafted with;
* a `LinkGuard` checked in that same hook: while the sidecar has not answered for `link_timeout_s`, a policy
  attached with `guard(policy)` does not use the adaptive drafter (the controller falls back to static).

`spawn_sidecar` starts `python -m adaspec.sidecar serve` as a real subprocess with the given settings and
waits until it answers admin `status` (tests, `adaspec bench drift --live --sidecar`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.engine.engine import SpecEngine, StepRecord
from adaspec.core.errors import AdaspecError
from adaspec.core.heads.adaptive import AdaptiveHead
from adaspec.core.link_guard import LinkGuard
from adaspec.core.log_publisher import LogMetrics, LogPublisher
from adaspec.core.serving_metrics import EngineMetrics, serve_metrics
from adaspec.core.transport import Transport, TransportError
from adaspec.core.transport_config import TransportSettings
from adaspec.core.weights import WeightStager, WeightSubscriber, per_registry
from adaspec.core.wire import AdminReply


class SidecarError(AdaspecError):
    """A sidecar process could not be started or did not become ready."""


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
    ) -> None:
        """`metrics_port` > 0 serves this registry (engine, log and weight series) on /metrics."""
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
            self.transport, server_id, feature_sample_rate=feature_sample_rate, version_of=self._version_of,
            features_of=self._features_of, registry=self.registry,
        )
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
        self._hooks = [(e.between_steps, self._between), (e.step_listeners, self.publisher),
                       (e.step_listeners, self._release_features), (e.step_listeners, self.metrics)]
        for hooks, fn in self._hooks:
            hooks.append(fn)
        e.record_features = True
        self.subscriber.start()
        if self._metrics_port and self.http is None:
            self.http = serve_metrics(self.registry, self._metrics_port, self._metrics_host)
        self._started = True
        return self

    def guard(self, policy: Any) -> "OnlineAdaptive":
        """Let `policy` (one with `set_available`, e.g. `AtlasPolicy`) use the adaptive drafter only while the
        sidecar answers; checked between steps."""
        self.link.attach(policy)
        return self

    def wait_synced(self, timeout: float) -> bool:
        """True once the subscriber has heard from the sidecar at least once (it keeps retrying anyway)."""
        return self.subscriber.synced.wait(timeout)

    def close(self) -> None:
        """Flush what is buffered (non-blocking), detach from the engine, stop the subscriber."""
        if self._started:
            for hooks, fn in self._hooks:
                if fn in hooks:
                    hooks.remove(fn)
            self.engine.record_features = self._record_features_before
            self.subscriber.stop()
            self._started = False
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
            self.swaps.append((self.engine.step_count, self.stager.version, pause))
            self.metrics.swap_pause.labels(self.drafter.name).observe(pause)

    def _version_of(self, drafter: str) -> int:
        return self.stager.version if drafter == self.drafter.name else 0

    def _features_of(self, rec: StepRecord) -> torch.Tensor | None:
        """Layer -1 at the positions that pair with emitted tokens (a prefill's prompt rows are not sent)."""
        f = rec.features
        return None if f is None else f[-(rec.accepted + 1):, self._layer]

    @staticmethod
    def _release_features(records: list[StepRecord]) -> None:
        """The publisher has copied them: do not keep hidden states alive in the results."""
        for r in records:
            r.features = None

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


# -- sidecar processes ------------------------------------------------------------------------------------------


def transport_env(settings: TransportSettings) -> dict[str, str]:
    """ADASPEC_TRANSPORT_* variables reproducing `settings` in a child process."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"ADASPEC_TRANSPORT_{name.upper()}"] = str(value)
    return env


class SidecarProcess:
    """A running `python -m adaspec.sidecar serve` child: admin calls, kill -9, graceful stop, restart."""

    def __init__(self, proc: subprocess.Popen, transport: TransportSettings, state_dir: Path, log_path: Path,
                 spawn_args: dict[str, Any]) -> None:
        self.proc, self.transport, self.state_dir, self.log_path = proc, transport, state_dir, log_path
        self._spawn_args = spawn_args

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def admin(self, command: str, timeout_ms: int = 10_000, **args: Any) -> AdminReply:
        """One admin request on a short-lived socket (TransportTimeout if the sidecar does not answer)."""
        with Transport(self.transport) as t:
            client = t.admin_client()
            try:
                return client.call(command, timeout_ms=timeout_ms, **args)
            finally:
                client.close()

    def status(self, timeout_ms: int = 10_000) -> dict[str, Any]:
        reply = self.admin("status", timeout_ms)
        if not reply.ok:
            raise SidecarError(f"status failed: {reply.error}")
        return dict(reply.status)

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Block until the sidecar answers `status`; SidecarError (with its log tail) if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise SidecarError(f"sidecar exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return self.status(timeout_ms=500)
            except (TransportError, SidecarError):
                pass
            if time.monotonic() >= deadline:
                self.kill()
                raise SidecarError(f"sidecar not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL (no cleanup at all, like a crash) and reap."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (final checkpoint, sockets closed), SIGKILL after `timeout_s`; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)

    def restart(self, ready_timeout_s: float = 60.0) -> "SidecarProcess":
        """Stop this one if it still runs, then spawn a new one with the same settings and state dir."""
        self.stop()
        return spawn_sidecar(**{**self._spawn_args, "ready_timeout_s": ready_timeout_s})

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "SidecarProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def spawn_sidecar(
    transport: TransportSettings,
    state_dir: Path | str,
    head: AdaptiveHead | None = None,
    settings: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 60.0,
    python: str = sys.executable,
) -> SidecarProcess:
    """Start a sidecar process on `transport` with its state in `state_dir` and wait until it is ready.

    head: the servers' adaptive head at version 0; written as the sidecar's head base if none exists yet
        (otherwise the sidecar builds the base from the target model, ADASPEC_MODEL).
    settings: sidecar knobs by field name (`lr`, `gate_every`, ...) -> ADASPEC_SIDECAR_<NAME>.
    env: extra environment variables for the child (e.g. OMP_NUM_THREADS).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if head is not None and not (state_dir / "base.safetensors").exists():
        from adaspec.sidecar.base import write_base  # the sidecar package reads what it writes

        write_base(head, state_dir / "base.safetensors")
    child_env = dict(os.environ)
    child_env.update(transport_env(transport))
    child_env["ADASPEC_SIDECAR_STATE_DIR"] = str(state_dir)
    for key, value in (settings or {}).items():
        child_env[f"ADASPEC_SIDECAR_{key.upper()}"] = str(value)
    child_env.update(env or {})
    log_path = state_dir / "sidecar.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [python, "-m", "adaspec.sidecar", "serve"], env=child_env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    spawn_args = dict(transport=transport, state_dir=state_dir, head=None, settings=dict(settings or {}),
                      env=dict(env or {}), python=python)
    sidecar = SidecarProcess(proc, transport, state_dir, log_path, spawn_args)
    sidecar.wait_ready(ready_timeout_s)
    return sidecar
