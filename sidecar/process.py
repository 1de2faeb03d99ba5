"""Sidecar processes started by another program (tests, `adaspec bench drift --live --sidecar`, `adaspec serve`).

`spawn_sidecar` starts `python -m adaspec.sidecar serve` as a real subprocess with the given settings and
waits until it answers admin `status`; `SidecarProcess` is the handle (admin calls, kill -9, graceful stop,
restart). A spawned sidecar watches its parent (`ADASPEC_SIDECAR_PARENT_PID`): when the parent is gone --
killed with SIGKILL included, where no cleanup of the parent's ever runs -- it stops itself gracefully
(final checkpoint), so a benchmark never leaves an orphan trainer eating the cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from pydantic import SecretStr

from adaspec.core.errors import AdaspecError
from adaspec.core.heads.adaptive import AdaptiveHead
from adaspec.core.online.settings import TransportSettings
from adaspec.core.online.transport import Transport, TransportError
from adaspec.core.online.wire import AdminReply


#: Knobs of a sidecar that shares the servers' cores (`adaspec serve`, `demo`, `bench drift --live`): it trains
#: only on cycles serving leaves idle, and its share follows what its drafter earns there (`sidecar/budget.py`:
#: about 0.003 of a core while the drafter supplies no served tokens, at most a quarter of a core). Measured on
#: the 2-core CPU: a learner at 0.23 of a core made the target's forward 1.72x slower, at 0.01 it cost nothing
#: measurable. ADASPEC_SIDECAR_* set by the user win.
COLOCATED: dict[str, Any] = {"priority": "idle", "cpu_share": 0.25, "share_follows_earnings": True}


class SidecarError(AdaspecError):
    """A sidecar process could not be started or did not become ready."""


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

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, all threads) the sidecar has used so far; None where /proc is absent."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

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
    colocated: bool = False,
) -> SidecarProcess:
    """Start a sidecar process on `transport` with its state in `state_dir` and wait until it is ready.

    head: the servers' adaptive head at version 0; written as the sidecar's head base if none exists yet
        (otherwise the sidecar builds the base from the target model, ADASPEC_MODEL).
    settings: sidecar knobs by field name (`lr`, `gate_every`, ...) -> ADASPEC_SIDECAR_<NAME>.
    env: extra environment variables for the child (e.g. OMP_NUM_THREADS).
    colocated: the sidecar shares this machine's cores with serving: `COLOCATED` scheduling and CPU share
        (unless `settings` or the environment set them).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if head is not None and not (state_dir / "base.safetensors").exists():
        from adaspec.core.heads.adaptive_base import write_base

        write_base(head, state_dir / "base.safetensors")
    child_env = dict(os.environ)
    child_env.update(transport_env(transport))
    child_env["ADASPEC_SIDECAR_STATE_DIR"] = str(state_dir)
    child_env["ADASPEC_SIDECAR_PARENT_PID"] = str(os.getpid())  # the child stops when we are gone
    for key, value in (COLOCATED if colocated else {}).items():
        child_env.setdefault(f"ADASPEC_SIDECAR_{key.upper()}", str(value))
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
                      env=dict(env or {}), python=python, colocated=colocated)
    sidecar = SidecarProcess(proc, transport, state_dir, log_path, spawn_args)
    sidecar.wait_ready(ready_timeout_s)
    return sidecar
