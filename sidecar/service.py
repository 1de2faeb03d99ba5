"""The sidecar service: ingest logs, train, gate, publish, roll back, checkpoint -- one loop, never stuck.

One thread owns the loop and every piece of state. Each turn it drains up to `max_batches_per_loop` log
batches (waiting at most `poll_ms`, and not at all while there is training to do), answers at most one admin
request, checks the serving version for a rollback, and -- unless paused -- runs one trainer update and, every
`gate_every` updates, the evaluation gate. Servers are never waited on: logs are pulled with timeouts, the
weight sync path runs in the publisher's own thread, and publishing is a non-blocking PUB send.

Durability: a version file is written before its broadcast and a checkpoint is taken on every publish (and
every `checkpoint_every` updates), so a restart (even after kill -9) resumes the trainer and republishes
nothing twice: the serving version and its number survive.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import logging
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from torch import Tensor

from adaspec.core.errors import ConfigError
from adaspec.core.metrics import per_registry
from adaspec.core.online.transport import Transport, WeightPublisher, private_dir
from adaspec.core.online.settings import TransportSettings
from adaspec.core.online.weights import copy_into
from adaspec.core.online.wire import AdminReply, AdminRequest, LogBatch, WeightUpdate
from adaspec.core.heads.adaptive_base import HeadBase, base_from_model, read_base
from adaspec.sidecar.budget import CpuBudget, EarnedShare, earned_cores
from adaspec.sidecar.checkpoint import CheckpointError, CheckpointStore, TrainerState, VersionRecord, export_head
from adaspec.sidecar.gate import GateDecision, decide
from adaspec.sidecar.metrics import SidecarMetrics
from adaspec.sidecar.buffer import ReplayBuffer
from adaspec.sidecar.samples import Samples, StreamAssembler
from adaspec.sidecar.served import ServedStats
from adaspec.sidecar.settings import SidecarSettings
from adaspec.sidecar.trainer import Trainer

log = logging.getLogger(__name__)


class _Publisher(WeightPublisher):
    """WeightPublisher that can be told the current version without broadcasting it (resume after restart:
    servers holding it need nothing; the others get it from the sync path)."""

    def restore(self, update: WeightUpdate) -> None:
        with self._lock:
            self._latest[update.drafter] = update


def set_priority(priority: str) -> str:
    """Apply the process's CPU scheduling ('idle': SCHED_IDLE where the OS has it, else nice 19); returns what
    was applied."""
    if priority != "idle":
        return "normal"
    import os

    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    os.nice(19)
    return "nice 19"


def load_base(settings: SidecarSettings) -> HeadBase:
    """The configured head base; built from the target model on first start when the file is missing."""
    path = settings.resolved_base_path()
    if not path.exists() and settings.base_path is None:
        log.info("no head base at %s: building one from the target model", path)
        return base_from_model(path, settings.inner_size, settings.seed)
    return read_base(path)


def _exclusive_lock(directory: Path, name: str = ".lock", what: str = "is running on"):
    """An exclusive lock on <directory>/<name> for this process's lifetime: two sidecars never share a state
    dir (`.lock`) or an IPC dir (`sidecar.lock`: binding an IPC path replaces the socket file, so a second
    sidecar would silently take the first one's traffic)."""
    f = open(directory / name, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(f"another sidecar {what} {directory} (it holds {directory / name})") from None
    return f


class SidecarService:
    """Everything one sidecar process does; `run()` loops until `stop()`, `run_once()` is one turn."""

    def __init__(
        self,
        settings: SidecarSettings,
        transport: Transport | TransportSettings | None = None,
        base: HeadBase | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = s = settings
        try:
            s.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_file = _exclusive_lock(s.state_dir)
        except OSError as exc:  # D14: read-only, not a dir, not ours -- an `error:` line, not a traceback
            raise ConfigError(f"sidecar state dir {s.state_dir} is unusable: {exc}") from None
        try:
            self._init(s, transport, base, registry)
        except BaseException:
            self._lock_file.close()
            raise

    def _init(self, s: SidecarSettings, transport, base: HeadBase | None, registry) -> None:
        self.base = base or load_base(s)
        cfg = self.base.config
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.metrics = per_registry(SidecarMetrics, self.registry)
        self.store = CheckpointStore(s.state_dir, s.drafter, self.base.fingerprint, s.keep_checkpoints, s.keep_versions)
        self.trainer = Trainer(self.base.build(lr=s.lr), s.unroll)
        self.serving_head = self.base.build()
        self.assembler = StreamAssembler(cfg.hidden_size, cfg.vocab_size, s.target_width(), s.holdout_fraction,
                                         s.max_streams)
        self.buffer = ReplayBuffer(cfg.hidden_size, s.target_width(), s.tenant_capacity, s.max_tenants,
                                   s.recency_half_life, s.tenant_balance, seed=s.seed)
        self.holdout = ReplayBuffer(cfg.hidden_size, s.target_width(), s.holdout_capacity, s.max_tenants,
                                    s.recency_half_life, s.tenant_balance, seed=s.seed + 1)
        self.served = ServedStats(s.drafter, s.rollback_window)
        self.paused = False
        self.serving_version = 0
        self.serving_record: VersionRecord | None = None
        self.history: list[VersionRecord] = []
        self.rollbacks: list[dict[str, Any]] = []
        self.last_gate: GateDecision | None = None
        self.last_checkpoint: str = ""
        self.started = time.time()
        self._budget = 0.0
        self.earned = EarnedShare(s.drafter)
        self._cpu = CpuBudget(self.cpu_share())
        self._updates_at_gate = 0
        self._updates_at_ckpt = 0
        self._gate_counts: collections.Counter[str] = collections.Counter()
        self._seen_rejects: dict[tuple[str, str], int] = {}
        self._seen_gaps: dict[str, int] = {}
        self._seen_disconnects = 0
        self.entries_received = 0  # log entries in valid batches (all servers; the metric has them by server)
        self._servers: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recently heard first
        self._last_gauges = 0.0
        self._labeled_tenants: set[str] = set()
        self._stop = threading.Event()
        self.final_checkpoint_failed = False
        self._highest_version = 0
        self.resume()

        own = not isinstance(transport, Transport)
        self.transport = transport if isinstance(transport, Transport) else Transport(transport)
        self._own_transport = own
        ts = self.transport.settings
        self.puller = self.admin = self.publisher = None
        self._run_locks: list = []
        try:
            ipc_dirs = {Path(ts.endpoint(ch)[len("ipc://"):]).parent for ch in ("logs", "weights", "sync", "admin")
                        if ts.endpoint(ch).startswith("ipc://")}
            for d in sorted(ipc_dirs):  # before any bind: a second sidecar refuses instead of stealing endpoints
                private_dir(d)
                self._run_locks.append(_exclusive_lock(d, "sidecar.lock", "serves the IPC endpoints in"))
            self.puller = self.transport.log_puller()
            self.publisher = _Publisher(self.transport.ctx, ts.endpoint("weights"), ts.endpoint("sync"),
                                        self.transport.keys, ts.weights_hwm, self.transport.limits)
            self.admin = self.transport.admin_server()
        except BaseException:
            self.close()
            raise
        if self.serving_version > 0:
            self.publisher.restore(self._update(self.serving_version, self._serving_weights()))
        from adaspec.core.metrics import serve_metrics

        self.http = serve_metrics(self.registry, s.metrics_port, s.metrics_host)
        self._update_gauges(force=True)

    # -- state ----------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Restore the newest valid checkpoint and the newest published version (if any)."""
        state = self.store.latest()
        stored = self.store.versions()
        if state is not None:
            self.trainer.load_weights(state.weights, reset_optimizer=False)
            self.trainer.load_optimizer_state(state.optimizer, state.optimizer_step)
            self.trainer.updates = self._updates_at_gate = self._updates_at_ckpt = state.updates
            self.trainer.trained_tokens = state.trained_tokens
            self.history, self.rollbacks = state.history, state.rollbacks
            self.last_checkpoint = str(state.path)
            for name, buf in (("buffer", self.buffer), ("holdout", self.holdout)):
                if name in state.buffers:
                    try:
                        buf.load_state(*state.buffers[name])
                    except (ValueError, KeyError, TypeError) as exc:  # another layout: learn it afresh
                        log.warning("checkpoint's %s not restored (%s): starting it empty", name, exc)
        self.restored_samples = (len(self.buffer), len(self.holdout))
        newest = max(stored, default=0)
        if state is not None and state.serving_version > newest:
            log.warning("checkpoint says v%d serves but only v%d is stored", state.serving_version, newest)
        # D8: never reuse a version number servers may hold, even when versions/ is lost -- the checkpoint
        # remembers what was published (servers reject a number they have seen as stale).
        self._highest_version = max([newest, state.serving_version if state else 0]
                                    + [r.version for r in (state.history if state else [])])
        for version in sorted(stored, reverse=True):  # the newest version file that verifies
            try:
                weights, record = self.store.load_version(version)
            except CheckpointError as exc:
                log.error("skipping damaged version file: %s", exc)
                continue
            self._set_serving(version, weights, record)
            if state is None:  # versions but no checkpoint: train on from what serves
                self.trainer.load_weights(weights)
            if not any(r.version == version for r in self.history):
                self.history.append(record)
            break
        log.info("resumed: serving v%d, %d updates, %d replay + %d held-out samples (%s)", self.serving_version,
                 self.trainer.updates, len(self.buffer), len(self.holdout), self.last_checkpoint or "no checkpoint")

    def _set_serving(self, version: int, weights: dict[str, Tensor], record: VersionRecord | None) -> None:
        copy_into(self.serving_head.state_dict(keep_vars=True), weights)
        self.serving_version, self.serving_record = version, record

    def _serving_weights(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.serving_head.state_dict().items()}

    def weights_of(self, version: int) -> dict[str, Tensor]:
        """Weights of a published version (0 = the base's initial weights); CheckpointError if not kept."""
        if version == 0:
            return {k: v.clone() for k, v in self.base.init.items()}
        if version == self.serving_version:
            return self._serving_weights()
        return self.store.load_version(version)[0]

    def _update(self, version: int, weights: dict[str, Tensor]) -> WeightUpdate:
        return WeightUpdate.build(self.settings.drafter, version, weights)

    def checkpoint(self) -> str:
        moments, step = self.trainer.optimizer_state()
        state = TrainerState(
            weights=self.trainer.weights(), optimizer=moments, optimizer_step=step,
            updates=self.trainer.updates, trained_tokens=self.trainer.trained_tokens,
            serving_version=self.serving_version, history=self.history, rollbacks=self.rollbacks,
            buffers={"buffer": self.buffer.state(), "holdout": self.holdout.state()},
        )
        path = self.store.save(state)
        self._updates_at_ckpt = self.trainer.updates
        self.last_checkpoint = str(path)
        self.metrics.checkpoints.inc()
        return self.last_checkpoint

    def publish(self, weights: dict[str, Tensor], source: str, reason: str = "", weights_of: int = 0,
                decision: GateDecision | None = None) -> int:
        """Persist, checkpoint, then broadcast `weights` as the next version; returns it."""
        version = max(self.serving_version, self._highest_version, max(self.store.versions(), default=0)) + 1
        self._highest_version = version
        record = VersionRecord(
            version=version, source=source, parent=self.serving_version, time=time.time(), reason=reason,
            candidate_tau=decision.candidate_tau if decision else 0.0,
            serving_tau=decision.serving_tau if decision else 0.0, weights_of=weights_of,
        )
        update = self._update(version, weights)  # validates shapes/dtypes before anything is written
        self.store.save_version(record, weights)
        self._set_serving(version, weights, record)
        self.history = [*self.history[-1023:], record]
        self.checkpoint()
        assert self.publisher is not None
        self.publisher.publish(update)
        self.store.prune_versions(protect={version, record.parent, weights_of})
        self.metrics.publishes.labels(source).inc()
        self.metrics.version.set(version)
        log.info("published v%d (%s) %s", version, source, reason)
        return version

    # -- loop -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until `stop()`; takes a final checkpoint if anything was learned since the last one."""
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:  # e.g. a full disk: log, count, back off, keep serving the sync path
                    log.exception("sidecar loop turn failed; continuing")
                    self.metrics.loop_errors.inc()
                    self._stop.wait(1.0)
        finally:
            if self.trainer.updates != self._updates_at_ckpt:
                try:
                    self.checkpoint()
                except Exception:
                    log.exception("final checkpoint failed")
                    self.final_checkpoint_failed = True  # D15: the exit code says so

    def stop(self) -> None:
        self._stop.set()

    def run_once(self) -> None:
        s = self.settings
        wait = 0 if self._train_ready() else s.poll_ms
        assert self.puller is not None and self.admin is not None
        for i in range(s.max_batches_per_loop):
            batch = self.puller.recv(wait if i == 0 else 0)
            if batch is None:
                break
            self.ingest(batch)
        self._add_samples(self.assembler.expire())
        self.admin.handle_one(self.handle_admin, 0)
        self.check_rollback()
        if not self.paused and self._train_ready():
            self.train_step()
        if not self.paused and self.trainer.updates - self._updates_at_gate >= s.gate_every:
            self.gate()
        if self.trainer.updates - self._updates_at_ckpt >= s.checkpoint_every:
            self.checkpoint()
        self._update_gauges()

    def ingest(self, batch: LogBatch) -> None:
        """One decoded batch: served-acceptance stats, then training/held-out samples."""
        server = batch.server_id
        self._servers[server] = None
        self._servers.move_to_end(server)
        while len(self._servers) > self.settings.max_servers:
            self._forget_server(next(iter(self._servers)))
        self.metrics.batches.labels(server).inc()
        self.metrics.entries.labels(server).inc(len(batch.entries))
        self.entries_received += len(batch.entries)
        self.served.add(server, batch.entries)
        if self.settings.share_follows_earnings:
            self.earned.add(batch.entries)
            self._cpu.share = self.cpu_share()
        self._add_samples(self.assembler.add_batch(batch))

    def _forget_server(self, server: str) -> None:
        """The least recently heard server beyond `max_servers`: its state and its metric series go."""
        self._servers.pop(server, None)
        self.assembler.forget_server(server)
        self.served.forget_server(server)
        self._seen_gaps.pop(server, None)
        for metric in (self.metrics.batches, self.metrics.entries, self.metrics.batches_lost):
            try:
                metric.remove(server)
            except KeyError:
                pass

    def _add_samples(self, groups: list[Samples]) -> None:
        s = self.settings
        for g in groups:
            if g.heldout:
                n = self.holdout.add(g, require_full=True)
                self.metrics.samples.labels("heldout").inc(n)
            else:
                n = self.buffer.add(g)
                self.metrics.samples.labels("train").inc(n)
                self._budget = min(self._budget + n * s.replay_ratio / s.batch_size, 4.0 * s.gate_every)

    def cpu_share(self) -> float:
        """Cores the learner may use now: fixed, or (co-located) what its drafter's earnings pay for."""
        s = self.settings
        if not s.share_follows_earnings:
            return s.cpu_share
        return earned_cores(self.earned.fraction, s.serving_tax_per_core, s.unearned_tax, s.cpu_share)

    def _train_ready(self) -> bool:
        return (not self.paused and self._budget >= 1.0 and len(self.buffer) >= self.settings.min_samples
                and self._cpu.available())

    def train_step(self) -> dict[str, float]:
        batch = self.buffer.sample(self.settings.batch_size)
        if batch is None:
            return {}
        self._budget -= 1.0
        report = self.trainer.step(*batch)
        self.metrics.updates.inc()
        self.metrics.trained_tokens.inc(report["tokens"])
        self.metrics.loss.set(self.trainer.last_loss)
        self.metrics.tokens_per_s.set(self.trainer.tokens_per_s)
        return report

    def gate(self) -> GateDecision | None:
        """Score candidate vs serving on the newest held-out samples; publish the candidate if it wins."""
        s = self.settings
        self._updates_at_gate = self.trainer.updates
        held = self.holdout.newest(s.gate_max_samples)
        if held is None:
            self._gate_counts["insufficient"] += 1
            self.metrics.gate.labels("insufficient").inc()
            return None
        d = decide(self.trainer.head, self.serving_head, held[0], held[1], s.gate_k, s.gate_margin,
                   s.gate_min_samples)
        self.last_gate = d
        label = "publish" if d.publish else ("insufficient" if d.candidate_tau == 0.0 else "hold")
        self._gate_counts[label] += 1
        self.metrics.gate.labels(label).inc()
        if d.candidate_tau:
            self.metrics.gate_tau.labels("candidate").set(d.candidate_tau)
            self.metrics.gate_tau.labels("serving").set(d.serving_tau)
        if d.publish:
            self.publish(self.trainer.weights(), "gate", d.reason, decision=d)
        return d

    def check_rollback(self) -> int | None:
        """Automatic rollback: re-publish the previous weights if the new version serves worse."""
        rec = self.serving_record
        if rec is None or rec.source != "gate":
            return None
        s = self.settings
        reason = self.served.rollback_reason(rec.version, rec.parent, s.rollback_min_drafted, s.rollback_margin,
                                             s.rollback_min_requests)
        if reason is None:
            return None
        return self.rollback_to(rec.parent, reason, kind="auto")

    def rollback_to(self, version: int, reason: str, kind: str = "operator") -> int:
        """Publish the weights of `version` as a new version; the trainer restarts from them."""
        weights = self.weights_of(version)  # CheckpointError if not kept
        bad = self.serving_version
        new = self.publish(weights, "rollback" if kind == "auto" else "operator-rollback", reason, weights_of=version)
        self.trainer.load_weights(weights)
        self.rollbacks = [*self.rollbacks[-1023:], {"time": time.time(), "kind": kind, "from": bad, "to": new,
                                                    "weights_of": version, "reason": reason}]
        self.metrics.rollbacks.labels(kind).inc()
        self.checkpoint()
        log.warning("rollback (%s): v%d -> v%d (weights of v%d): %s", kind, bad, new, version, reason)
        return new

    def reset(self) -> int:
        """Forget everything learned: base weights, fresh optimizer, empty buffers; publish them."""
        self.trainer.load_weights(self.weights_of(0))
        self.buffer.clear()
        self.holdout.clear()
        self.assembler.flush_all()
        self._budget = 0.0
        return self.publish(self.weights_of(0), "reset", "operator reset")

    def export(self, path: str) -> str:
        """Write the serving head where an operator asks (D16: an absolute path, into an existing directory,
        never over an existing file, never inside the state dir -- an admin peer cannot clobber the base or any
        other file the sidecar can write)."""
        target = Path(path)
        if not target.is_absolute():
            raise ConfigError(f"export needs an absolute path (got {path!r}: relative to the sidecar's cwd?)")
        if "\0" in path:
            raise ConfigError("export path contains a NUL byte")
        parent = target if target.is_dir() else target.parent
        if not parent.is_dir():
            raise ConfigError(f"export: directory {parent} does not exist")
        state = self.settings.state_dir.resolve()
        if parent.resolve() == state or state in parent.resolve().parents:
            raise ConfigError("export: refusing to write inside the sidecar's state dir")
        if not target.is_dir() and (target.exists() or target.is_symlink()):
            raise ConfigError(f"export: {target} exists; choose a new file name")
        cfg = dataclasses.asdict(self.serving_head.cfg)
        out = export_head(target, self._serving_weights(), cfg, self.serving_version, self.settings.drafter)
        return str(out)

    # -- admin ----------------------------------------------------------------------------------------------
    def handle_admin(self, request: AdminRequest) -> AdminReply:
        from adaspec.sidecar.admin import handle

        return handle(self, request)

    def status(self) -> dict[str, Any]:
        from adaspec.sidecar.admin import status

        return status(self)

    # -- metrics --------------------------------------------------------------------------------------------
    def _update_gauges(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_gauges < 0.5:
            return
        self._last_gauges = now
        m = self.metrics
        assert self.puller is not None and self.admin is not None
        for channel, counter in (("logs", self.puller.rejected), ("admin", self.admin.rejected),
                                 ("entries", self.assembler.rejected)):
            for reason, n in counter.items():
                key = (channel, reason)
                delta = n - self._seen_rejects.get(key, 0)
                if delta > 0:
                    (m.entries_rejected.labels(reason) if channel == "entries"
                     else m.messages_rejected.labels(channel, reason)).inc(delta)
                    self._seen_rejects[key] = n
        if self.puller.disconnects > self._seen_disconnects:
            m.log_disconnects.inc(self.puller.disconnects - self._seen_disconnects)
            self._seen_disconnects = self.puller.disconnects
        for server, n in self.assembler.gaps.items():
            delta = n - self._seen_gaps.get(server, 0)
            if delta > 0:
                m.batches_lost.labels(server).inc(delta)
                self._seen_gaps[server] = n
        m.version.set(self.serving_version)
        m.paused.set(1 if self.paused else 0)
        m.cpu_share.set(self.cpu_share())
        m.earned_fraction.set(self.earned.fraction)
        fill = self.buffer.fill()
        for tenant, n in fill.items():
            m.buffer_samples.labels(tenant).set(n)
        for tenant in self._labeled_tenants - fill.keys():  # evicted: drop the series, do not leave it stale
            m.buffer_samples.remove(tenant)
        self._labeled_tenants = set(fill)
        m.buffer_fill.set(len(self.buffer) / max(1, self.buffer.capacity))
        m.holdout_samples.set(len(self.holdout))
        rec = self.serving_record
        m.served_acceptance.labels("serving").set(self.served.acceptance(self.serving_version)[0])
        if rec is not None:
            m.served_acceptance.labels("previous").set(self.served.acceptance(rec.parent)[0])

    def rejected_total(self) -> dict[str, int]:
        """Every refusal so far, `channel.reason` -> count (wire decode and entry validation)."""
        out: dict[str, int] = {}
        assert self.puller is not None and self.admin is not None
        for channel, counter in (("logs", self.puller.rejected), ("admin", self.admin.rejected),
                                 ("entries", self.assembler.rejected)):
            for reason, n in counter.items():
                out[f"{channel}.{reason}"] = int(n)
        return out

    def close(self) -> None:
        for part in (self.admin, self.publisher, self.puller):
            if part is not None:
                try:
                    part.close()
                except Exception:
                    log.debug("close failed", exc_info=True)
        if getattr(self, "http", None) is not None:
            self.http.shutdown()
            self.http.server_close()
        if getattr(self, "_own_transport", False):
            self.transport.close()
        for lock in getattr(self, "_run_locks", []):
            lock.close()  # releases the IPC endpoints
        self._lock_file.close()  # releases the state dir
