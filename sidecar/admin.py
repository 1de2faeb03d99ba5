"""Admin commands of a running sidecar (REQ/REP), and the flat status payload the CLI renders.

Commands: status, pause, resume, snapshot, rollback(version), reset, export(path). Every reply is an
`AdminReply`; a bad command or argument is an error reply, never an exception in the service loop. The
status is flat (the wire allows scalars, lists and str->scalar maps): per-version lists share one index,
per-tenant tau trends are maps under `tau.<tenant>`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from adaspec.core.errors import AdaspecError
from adaspec.core.online.wire import AdminReply, AdminRequest
from adaspec.sidecar.checkpoint import CheckpointError

if TYPE_CHECKING:
    from adaspec.sidecar.service import SidecarService

COMMANDS = ("status", "pause", "resume", "snapshot", "rollback", "reset", "export")
MAX_TENANTS_SHOWN = 32
MAX_VERSIONS_SHOWN = 16


def handle(svc: "SidecarService", req: AdminRequest) -> AdminReply:
    """Run one admin command; errors become `ok=False` replies."""
    try:
        cmd = req.command
        if cmd == "status":
            return AdminReply(ok=True, status=status(svc))
        if cmd == "pause":
            svc.paused = True
            return AdminReply(ok=True, status={"paused": True})
        if cmd == "resume":
            svc.paused = False
            return AdminReply(ok=True, status={"paused": False})
        if cmd == "snapshot":
            return AdminReply(ok=True, status={"checkpoint": svc.checkpoint()})
        if cmd == "rollback":
            version = req.args.get("version")
            if type(version) is not int or version < 0:
                return AdminReply(ok=False, error="rollback needs an integer argument 'version' >= 0")
            if version > svc.serving_version:
                return AdminReply(ok=False, error=f"version {version} was never published (serving v{svc.serving_version})")
            new = svc.rollback_to(version, str(req.args.get("reason") or "operator rollback"), kind="operator")
            return AdminReply(ok=True, status={"version": new, "weights_of": version})
        if cmd == "reset":
            return AdminReply(ok=True, status={"version": svc.reset()})
        if cmd == "export":
            path = req.args.get("path")
            if not isinstance(path, str) or not path:
                return AdminReply(ok=False, error="export needs a string argument 'path'")
            return AdminReply(ok=True, status={"path": svc.export(path), "version": svc.serving_version})
        return AdminReply(ok=False, error=f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
    except (CheckpointError, AdaspecError) as exc:
        return AdminReply(ok=False, error=str(exc)[:2000])
    except OSError as exc:
        return AdminReply(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])


def status(svc: "SidecarService") -> dict[str, Any]:
    """Everything the `adaspec sidecar status` tables show, as flat wire values."""
    t = svc.trainer
    d = svc.last_gate
    rec = svc.serving_record
    out: dict[str, Any] = {
        "drafter": svc.settings.drafter,
        "version": svc.serving_version,
        "version_source": rec.source if rec else "initial",
        "version_parent": rec.parent if rec else 0,
        "paused": svc.paused,
        "cpu_share": round(svc.cpu_share(), 5),
        "earned_fraction": round(svc.earned.fraction, 4),
        "uptime_s": round(time.time() - svc.started, 1),
        "updates": t.updates,
        "trained_tokens": t.trained_tokens,
        "tokens_per_s": round(t.tokens_per_s, 1),
        "loss": None if t.last_loss != t.last_loss else round(t.last_loss, 4),
        "buffer_samples": len(svc.buffer),
        "buffer_capacity": svc.buffer.capacity,
        "holdout_samples": len(svc.holdout),
        "restored_buffer_samples": svc.restored_samples[0],  # what the checkpoint resumed from held
        "restored_holdout_samples": svc.restored_samples[1],
        "streams": len(svc.assembler.streams),
        "gate_publish": svc._gate_counts["publish"],
        "gate_hold": svc._gate_counts["hold"],
        "gate_insufficient": svc._gate_counts["insufficient"],
        "gate_candidate_tau": round(d.candidate_tau, 4) if d else None,
        "gate_serving_tau": round(d.serving_tau, 4) if d else None,
        "gate_reason": d.reason if d else "",
        "rollbacks": len(svc.rollbacks),
        "last_rollback": svc.rollbacks[-1]["reason"][:500] if svc.rollbacks else "",
        "checkpoint": svc.last_checkpoint,
        "last_publish_time": rec.time if rec else None,
        "log_entries_received": svc.entries_received,
        "logs_rejected": sum(svc.rejected_total().values()),
        "logs_lost": int(sum(svc.assembler.gaps.values())),
        "log_disconnects": svc.puller.disconnects,  # incl. frames over max_message_bytes (libzmq drops both)
    }
    out["rejected"] = dict(list(svc.rejected_total().items())[:64])
    out["buffer_fill"] = {k: v for k, v in list(svc.buffer.fill().items())[:MAX_TENANTS_SHOWN]}
    out["lost_by_server"] = {k: int(v) for k, v in list(svc.assembler.gaps.items())[:MAX_TENANTS_SHOWN]}
    out["server_versions"] = {k: v for k, (v, _) in list(svc.served.servers.items())[:MAX_TENANTS_SHOWN]}
    hist = svc.history[-MAX_VERSIONS_SHOWN:]
    out["versions"] = [r.version for r in hist]
    out["versions_source"] = [r.source for r in hist]
    out["versions_time"] = [r.time for r in hist]
    out["versions_gate_tau"] = [round(r.candidate_tau, 4) for r in hist]
    acc = [svc.served.acceptance(r.version) for r in hist]
    out["versions_acceptance"] = [round(a, 4) if n else None for a, n in acc]
    out["versions_drafted"] = [n for _, n in acc]
    tenants = list(svc.served.tenants.items())[-MAX_TENANTS_SHOWN:]
    out["tenants"] = [name for name, _ in tenants]
    for name, trend in tenants:
        out[f"tau.{name}"] = {f"v{v}": round(tv.tau, 4) for v, tv in trend.items()}
    return out
