"""`adaspec sidecar ...`: run the sidecar, and operate a running one over its admin socket.

serve runs the service in the foreground (SIGTERM/SIGINT: final checkpoint, clean exit). The other
commands are admin requests; endpoints and keys come from ADASPEC_TRANSPORT_*, sidecar knobs from
ADASPEC_SIDECAR_*. A sidecar that does not answer, or refuses a command, is one `error:` line and exit 2.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from adaspec.core.config import load, settings_rows
from adaspec.core.console import err, out, run_cli
from adaspec.core.errors import AdaspecError, ConfigError

app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_enable=False,
    help="The online trainer process: serve it, or operate a running one.",
)


class SidecarCommandError(AdaspecError):
    """The sidecar answered but refused the command."""


def _transport_settings():
    from adaspec.core.online.settings import TransportSettings

    return load(TransportSettings, "transport settings")


def _call(command: str, timeout_ms: int, **args: Any) -> dict[str, Any]:
    from adaspec.core.online.transport import Transport

    with Transport(_transport_settings()) as t:
        client = t.admin_client()
        try:
            reply = client.call(command, timeout_ms=timeout_ms, **args)
        finally:
            client.close()
    if not reply.ok:
        raise SidecarCommandError(f"sidecar refused {command}: {reply.error}")
    return dict(reply.status)


TimeoutOpt = typer.Option(10_000, "--timeout-ms", help="Give up if the sidecar does not answer in this long.")


@app.command("serve")
def serve(
    state_dir: Optional[Path] = typer.Option(None, help="State dir (default ADASPEC_SIDECAR_STATE_DIR)."),
    base: Optional[Path] = typer.Option(None, help="Head base file (default <state_dir>/base.safetensors)."),
    metrics_port: Optional[int] = typer.Option(None, help="Prometheus /metrics port (0 = off)."),
    log_level: str = typer.Option("INFO", help="Python logging level."),
) -> None:
    """Run the sidecar in the foreground until SIGTERM/SIGINT."""
    from adaspec.sidecar.service import SidecarService, set_priority
    from adaspec.sidecar.settings import load_sidecar_settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_sidecar_settings(state_dir=state_dir, base_path=base, metrics_port=metrics_port)
    transport = _transport_settings()
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    applied = set_priority(settings.priority)
    svc = SidecarService(settings, transport)

    def _stop(signum, _frame) -> None:
        logging.getLogger("adaspec.sidecar").info("signal %d: stopping", signum)
        svc.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if settings.parent_pid:
        _watch_parent(settings.parent_pid, svc.stop)
    logging.getLogger("adaspec.sidecar").info(
        "ready: v%d, logs %s, admin %s, scheduling %s, cpu share %.4f cores%s", svc.serving_version,
        svc.puller.endpoint, svc.admin.endpoint, applied, svc.cpu_share(),
        f" (follows earnings, at most {settings.cpu_share:g})" if settings.share_follows_earnings else "",
    )
    try:
        svc.run()
    finally:
        svc.close()
    if svc.final_checkpoint_failed:  # what was learned since the last checkpoint is lost: not a clean exit
        err.print("error: the final checkpoint failed (see the log); updates since the last one are lost")
        raise typer.Exit(1)


def _watch_parent(parent_pid: int, stop, period_s: float = 0.5) -> None:
    """Call `stop` once `parent_pid` is no longer our parent (it exited or was killed: we were re-parented)."""
    import os
    import threading

    def _run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period_s)
        logging.getLogger("adaspec.sidecar").warning("parent %d is gone: stopping", parent_pid)
        stop()

    threading.Thread(target=_run, name="adaspec-parent-watch", daemon=True).start()


@app.command("status")
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the raw status as JSON."),
    timeout_ms: int = TimeoutOpt,
) -> None:
    """Versions, tau trend per tenant, buffer fill, dropped logs, last swap."""
    st = _call("status", timeout_ms)
    if as_json:
        out.print_json(json.dumps(st))
        return
    for table in status_tables(st):
        out.print(table)


@app.command("pause")
def pause_cmd(timeout_ms: int = TimeoutOpt) -> None:
    """Stop training and publishing (logs are still ingested)."""
    _call("pause", timeout_ms)
    out.print("paused")


@app.command("resume")
def resume_cmd(timeout_ms: int = TimeoutOpt) -> None:
    """Resume training and publishing."""
    _call("resume", timeout_ms)
    out.print("resumed")


@app.command("snapshot")
def snapshot_cmd(timeout_ms: int = TimeoutOpt) -> None:
    """Write a checkpoint now."""
    out.print(_call("snapshot", timeout_ms)["checkpoint"])


@app.command("rollback")
def rollback_cmd(
    version: int = typer.Argument(..., min=0, help="Version whose weights to serve again (0 = initial)."),
    reason: str = typer.Option("operator rollback", help="Recorded with the rollback."),
    timeout_ms: int = TimeoutOpt,
) -> None:
    """Re-publish the weights of VERSION as a new, higher version."""
    st = _call("rollback", timeout_ms, version=version, reason=reason)
    out.print(f"published v{st['version']} with the weights of v{st['weights_of']}")


@app.command("reset")
def reset_cmd(
    yes: bool = typer.Option(False, "--yes", help="Confirm: forget everything learned."),
    timeout_ms: int = TimeoutOpt,
) -> None:
    """Back to the initial weights with empty buffers (published as a new version)."""
    if not yes:
        raise ConfigError("reset forgets everything the sidecar learned; pass --yes to confirm")
    st = _call("reset", timeout_ms)
    out.print(f"reset: published the initial weights as v{st['version']}")


@app.command("export")
def export_cmd(
    path: Path = typer.Argument(..., help="File (or dir) to write the serving head to (safetensors)."),
    timeout_ms: int = TimeoutOpt,
) -> None:
    """Write the serving weights as a head file (ADASPEC_ADAPTIVE_HEAD_PATH can load it)."""
    st = _call("export", timeout_ms, path=str(path.expanduser().resolve()))
    out.print(f"v{st['version']} -> {st['path']}")


@app.command("settings")
def settings_cmd() -> None:
    """Every sidecar knob: env var, default and meaning (transport knobs: ADASPEC_TRANSPORT_*)."""
    from adaspec.sidecar.settings import SidecarSettings

    table = Table("env var", "default", "meaning", title="sidecar settings")
    for env, default, desc in settings_rows(SidecarSettings):
        table.add_row(env, default, desc)
    out.print(table)


# -- rendering ---------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def status_tables(st: dict[str, Any]) -> list[Table]:
    """The rich tables of `adaspec sidecar status` (also used by tests)."""
    tables = []
    summary = Table("sidecar", "", title=f"{st.get('drafter', '?')} sidecar", show_header=False)
    last = st.get("last_publish_time")
    ago = f" ({time.time() - last:.0f} s ago)" if isinstance(last, (int, float)) else ""
    fill = st.get("buffer_samples", 0) / max(1, st.get("buffer_capacity", 1))
    rows = [
        ("serving version", f"v{st.get('version')} ({st.get('version_source')}, after v{st.get('version_parent')})"
                            f"{ago}"),
        ("state", "paused" if st.get("paused") else "training"),
        ("updates / tokens", f"{st.get('updates')} / {st.get('trained_tokens')}"),
        ("loss / tokens/s", f"{_fmt(st.get('loss'), 4)} / {_fmt(st.get('tokens_per_s'), 1)}"),
        ("buffer", f"{st.get('buffer_samples')} / {st.get('buffer_capacity')} ({fill:.1%}); "
                   f"held out {st.get('holdout_samples')}"),
        ("gate", f"publish {st.get('gate_publish')}, hold {st.get('gate_hold')}, "
                 f"insufficient {st.get('gate_insufficient')}; last: {st.get('gate_reason') or '-'}"),
        ("rollbacks", f"{st.get('rollbacks')} {st.get('last_rollback') or ''}".strip()),
        ("dropped logs", f"{st.get('logs_lost')} batches lost upstream, {st.get('logs_rejected')} refused"),
        ("checkpoint", str(st.get("checkpoint") or "-")),
    ]
    for k, v in rows:
        summary.add_row(k, v)
    tables.append(summary)

    versions = Table("version", "source", "published", "gate tau", "served acceptance", "drafted",
                     title="versions")
    for i, v in enumerate(st.get("versions", [])):
        t = st["versions_time"][i]
        versions.add_row(f"v{v}", st["versions_source"][i], time.strftime("%H:%M:%S", time.localtime(t)),
                         _fmt(st["versions_gate_tau"][i] or None), _fmt(st["versions_acceptance"][i]),
                         str(st["versions_drafted"][i]))
    tables.append(versions)

    trend = Table("tenant", "tau by version (oldest -> newest)", "buffered", title="tau trend per tenant")
    fill_by = st.get("buffer_fill", {})
    for tenant in st.get("tenants", []):
        series = st.get(f"tau.{tenant}", {})
        trend.add_row(tenant, "  ".join(f"{v}={_fmt(t, 2)}" for v, t in series.items()), str(fill_by.get(tenant, 0)))
    tables.append(trend)

    servers = Table("server", "version in use (last swap)", "batches lost", title="servers")
    lost = st.get("lost_by_server", {})
    for server, v in st.get("server_versions", {}).items():
        servers.add_row(server, f"v{v}", str(lost.get(server, 0)))
    tables.append(servers)
    if st.get("rejected"):
        rej = Table("channel.reason", "count", title="refused input")
        for k, n in st["rejected"].items():
            rej.add_row(k, str(n))
        tables.append(rej)
    return tables


def main() -> None:
    """`python -m adaspec.sidecar`: same error handling as the `adaspec` CLI."""
    run_cli(app)
