"""Engine-side weight receiver: validate updates off the hot path, swap them in place between steps.

`WeightStager.offer` (any thread) checks a `WeightUpdate` completely -- drafter, version, exact tensor names,
dtypes, shapes, checksum, finite values -- and stages a full copy on the module's device. Nothing about the
module changes there. `apply_if_staged` (the engine's `between_steps` hook) copies every staged tensor into
the existing parameter storage under no_grad, so data pointers never move (CUDA-graph safe) and a step always
runs with one complete version. A rejected update is counted by reason and never raises into serving.
`WeightSubscriber` runs the SUB/REQ sockets in a background thread and feeds `offer`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Mapping

import torch
from prometheus_client import CollectorRegistry

from adaspec.core.metrics import WeightMetrics, per_registry
from adaspec.core.online.transport import Transport, TransportError
from adaspec.core.online.wire import DTYPES, WeightUpdate, blob_to_tensor

log = logging.getLogger(__name__)

# Rejection reasons (label values of adaspec_weight_updates_rejected_total).
WRONG_DRAFTER = "wrong_drafter"
STALE = "stale"
MISSING = "missing"
EXTRA = "extra"
DTYPE = "dtype"
SHAPE = "shape"
CHECKSUM = "checksum"
NONFINITE = "nonfinite"
TIED_MISMATCH = "tied_mismatch"
INTERNAL = "internal"


def copy_into(targets: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> None:
    """Copy `weights[name]` into each existing tensor `targets[name]` in place: data pointers never move, so
    CUDA graphs captured over them stay valid. The one way adaspec swaps weights (servers, sidecar, trainer)."""
    with torch.no_grad():
        for name, target in targets.items():
            src = weights[name]
            target.data.copy_(src)
            if src.is_cuda:  # the copy is queued on the current stream: keep src alive until it runs
                src.record_stream(torch.cuda.current_stream(src.device))


class WeightStager:
    """Validates and stages updates for one drafter module; applies them in place between engine steps."""

    def __init__(
        self,
        module: torch.nn.Module,
        drafter_name: str,
        names: Iterable[str] | None = None,
        registry: CollectorRegistry | None = None,
        version: int = 0,
    ) -> None:
        """`names`: the published tensors (default: the whole state_dict, parameters and persistent buffers)."""
        state = module.state_dict(keep_vars=True)
        names = list(state) if names is None else list(names)
        unknown = [n for n in names if n not in state]
        if unknown:
            raise ValueError(f"{drafter_name}: not in the module's state_dict: {unknown}")
        self.drafter = drafter_name
        self._targets: dict[str, torch.Tensor] = {n: state[n] for n in names}
        self._tied = _tied_groups(self._targets)
        self.version = version
        self.metrics = per_registry(WeightMetrics, registry)
        self.metrics.version.labels(drafter_name).set(version)
        self.last_reject: str | None = None
        self.last_pause_s = 0.0
        self._staged: tuple[int, dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()
        self._offer_lock = threading.Lock()
        devices = {t.device for t in self._targets.values() if t.device.type == "cuda"}
        self._stream = torch.cuda.Stream(device=next(iter(devices))) if devices else None

    @property
    def staged_version(self) -> int | None:
        with self._lock:
            return None if self._staged is None else self._staged[0]

    def newest_version(self) -> int:
        """The version this server has or is about to apply (what a Hello should report)."""
        staged = self.staged_version
        return self.version if staged is None else max(self.version, staged)

    def offer(self, update: WeightUpdate) -> bool:
        """Validate and stage `update`; False (counted by reason) if refused. Never raises."""
        try:
            with self._offer_lock:
                reason = self._stage(update)
        except Exception:
            log.exception("%s: unexpected error validating weight update", self.drafter)
            reason = INTERNAL
        if reason is None:
            self.metrics.staged.labels(self.drafter).inc()
            return True
        self.last_reject = reason
        self.metrics.rejected.labels(self.drafter, reason).inc()
        log.warning("%s: weight update v%s rejected (%s)", self.drafter, getattr(update, "version", "?"), reason)
        return False

    def _stage(self, update: WeightUpdate) -> str | None:
        if update.drafter != self.drafter:
            return WRONG_DRAFTER
        if update.version <= self.newest_version():
            return STALE
        blobs = {t.name: t for t in update.tensors}
        if blobs.keys() - self._targets.keys():
            return EXTRA
        if self._targets.keys() - blobs.keys():
            return MISSING
        for name, blob in blobs.items():
            target = self._targets[name]
            if DTYPES[blob.dtype] != target.dtype:
                return DTYPE
            if tuple(blob.shape) != tuple(target.shape):
                return SHAPE
        if not update.checksum_ok():
            return CHECKSUM
        cpu = {name: blob_to_tensor(blob) for name, blob in blobs.items()}
        for t in cpu.values():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return NONFINITE
        for group in self._tied:
            if not all(torch.equal(cpu[group[0]], cpu[n]) for n in group[1:]):
                return TIED_MISMATCH
        staged = self._to_devices(cpu)
        with self._lock:
            if update.version <= max(self.version, -1 if self._staged is None else self._staged[0]):
                return STALE
            self._staged = (update.version, staged)  # a newer staged update replaces an older one whole
        return None

    def _to_devices(self, cpu: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies on the targets' devices; CUDA copies run on a side stream so serving never waits on them."""
        if self._stream is None:
            return {n: t.to(self._targets[n].device) for n, t in cpu.items()}
        out: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(self._stream):
            for n, t in cpu.items():
                dev = self._targets[n].device
                out[n] = t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t
        self._stream.synchronize()
        return out

    def apply_if_staged(self) -> float:
        """Swap in the staged update, if any, in place; returns the serving pause in seconds (0.0 if none)."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None:
            return 0.0
        version, tensors = staged
        t0 = time.perf_counter()
        try:
            copy_into(self._targets, tensors)
        except Exception:  # validation makes this unreachable short of a device fault; never raise into serving
            log.exception("%s: applying weight update v%d failed", self.drafter, version)
            self.metrics.rejected.labels(self.drafter, INTERNAL).inc()
            return time.perf_counter() - t0
        self.version = version
        self.last_pause_s = pause = time.perf_counter() - t0
        self.metrics.applied.labels(self.drafter).inc()
        self.metrics.version.labels(self.drafter).set(version)
        self.metrics.pause.labels(self.drafter).set(pause)
        return pause

    __call__ = apply_if_staged  # so the stager itself can be appended to SpecEngine.between_steps


def _tied_groups(targets: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names that share one storage (tied weights): an update must give them identical values."""
    by_ptr: dict[tuple, list[str]] = {}
    for name, t in targets.items():
        if t.numel():
            by_ptr.setdefault((t.device, t.data_ptr(), tuple(t.shape), t.dtype), []).append(name)
    return [g for g in by_ptr.values() if len(g) > 1]


class WeightSubscriber:
    """Background thread: asks for current weights at start (and every `resync_s`), then follows the PUB."""

    def __init__(
        self,
        transport: Transport,
        stagers: Iterable[WeightStager],
        server_id: str,
        resync_s: float | None = None,
        poll_ms: int = 100,
    ) -> None:
        self.transport = transport
        self.stagers = {s.drafter: s for s in stagers}
        self.server_id = server_id
        self.resync_s = transport.settings.resync_s if resync_s is None else resync_s
        self.poll_ms = poll_ms
        self.synced = threading.Event()
        self.sync_failures = 0
        #: time.monotonic() of the last answer or update from the sidecar (None: never heard from it).
        self.last_contact: float | None = None
        self.received = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "WeightSubscriber":
        self._thread = threading.Thread(target=self._run, name="adaspec-weight-sub", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def link_up(self, timeout_s: float, now: float | None = None) -> bool:
        """Whether the sidecar answered within the last `timeout_s` (a sync is also the heartbeat)."""
        last = self.last_contact
        return last is not None and (time.monotonic() if now is None else now) - last <= timeout_s

    def _offer(self, update: WeightUpdate) -> None:
        self.last_contact = time.monotonic()
        self.received += 1
        stager = self.stagers.get(update.drafter)
        if stager is not None:
            stager.offer(update)

    def _run(self) -> None:
        client = self.transport.weight_client(self.stagers)  # created here: the socket belongs to this thread
        next_sync = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if time.monotonic() >= next_sync:
                        next_sync = self._sync(client)
                    update = client.recv(self.poll_ms)
                    if update is not None:
                        self._offer(update)
                except Exception:  # keep following updates whatever one message or the network did
                    log.exception("weight subscriber: unexpected error")
                    self._stop.wait(0.5)
        finally:
            client.close()

    def _sync(self, client) -> float:
        have = {name: s.newest_version() for name, s in self.stagers.items()}
        try:
            ack = client.sync(self.server_id, have)
        except TransportError as exc:
            self.sync_failures += 1
            log.warning("weight sync failed (%s); retrying", exc)
            return time.monotonic() + min(1.0, self.resync_s)
        self.last_contact = time.monotonic()
        for update in ack.updates:
            self._offer(update)
        self.synced.set()
        return time.monotonic() + self.resync_s
