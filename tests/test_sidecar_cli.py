"""`adaspec sidecar ...` against a running in-process sidecar, and its user errors (one line, exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from adaspec.core.cli import app as root_app
from adaspec.core.heads.adaptive import AdaptiveHead
from adaspec.core.heads.adaptive_base import write_base
from adaspec.sidecar.service import SidecarService
from adaspec.sidecar.settings import SidecarSettings
from sidecar_helpers import chaotic_target, cleanup, short_dir, transport_settings

runner = CliRunner()


@pytest.fixture(scope="module")
def running():
    root = short_dir()
    write_base(AdaptiveHead.for_target(chaotic_target(), inner_size=32), root / "base.safetensors")
    svc = SidecarService(SidecarSettings(state_dir=root / "state", base_path=root / "base.safetensors", poll_ms=10),
                         transport_settings(root))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    yield root, svc
    svc.stop()
    thread.join(30)
    svc.close()
    cleanup(root)


def _run(root, *args):
    env = {"ADASPEC_TRANSPORT_RUN_DIR": str(root / "run"), "COLUMNS": "160"}
    return runner.invoke(root_app, ["sidecar", *args], env=env)


def test_operator_commands(running, tmp_path):
    root, svc = running
    r = _run(root, "status")
    assert r.exit_code == 0, r.output
    for title in ("serving version", "versions", "tau trend per tenant", "servers", "buffer", "dropped logs"):
        assert title in r.output
    assert _run(root, "pause").output.strip() == "paused" and svc.paused
    assert "paused" in _run(root, "status").output
    assert _run(root, "resume").exit_code == 0 and not svc.paused
    assert "ckpt-" in _run(root, "snapshot").output
    r = _run(root, "rollback", "0", "--reason", "bad deploy")
    assert r.exit_code == 0 and "published v1 with the weights of v0" in r.output
    assert _run(root, "reset", "--yes").output.startswith("reset: published the initial weights as v2")
    r = _run(root, "export", str(tmp_path / "head.safetensors"))
    assert r.exit_code == 0 and (tmp_path / "head.safetensors").is_file()
    r = _run(root, "status", "--json")
    assert r.exit_code == 0 and '"version": 2' in r.output and '"rollbacks": 1' in r.output
    r = _run(root, "status")
    assert "v1" in r.output and "operator-rollback" in r.output and "reset" in r.output


def _module(*args, env=None, timeout=60):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "adaspec.sidecar", *args], capture_output=True, text=True,
                          env=full, timeout=timeout)


def test_refused_command_and_dead_sidecar_are_one_error_line(running):
    root, _ = running
    r = _module("rollback", "99", env={"ADASPEC_TRANSPORT_RUN_DIR": str(root / "run")})
    assert r.returncode == 2 and r.stderr.startswith("error: sidecar refused rollback: version 99 was never")
    assert "Traceback" not in r.stderr
    r = _module("reset", env={"ADASPEC_TRANSPORT_RUN_DIR": str(root / "run")})
    assert r.returncode == 2 and "--yes" in r.stderr
    nobody = short_dir()
    try:
        r = _module("status", "--timeout-ms", "300", env={"ADASPEC_TRANSPORT_RUN_DIR": str(nobody / "run")})
        assert r.returncode == 2 and "no reply within 300 ms" in r.stderr and "Traceback" not in r.stderr
    finally:
        cleanup(nobody)


def test_settings_lists_every_knob():
    from adaspec.sidecar.settings import SidecarSettings

    r = runner.invoke(root_app, ["sidecar", "settings"], env={"COLUMNS": "250"})
    assert r.exit_code == 0
    for name in SidecarSettings.model_fields:
        assert f"ADASPEC_SIDECAR_{name.upper()}" in r.output


def test_serve_refuses_tcp_without_curve_keys(tmp_path):
    r = _module("serve", "--state-dir", str(tmp_path), env={"ADASPEC_TRANSPORT_LOGS_ENDPOINT": "tcp://127.0.0.1:5599"})
    assert r.returncode == 2 and "CURVE" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())  # refused before touching any state


def test_serve_rejects_bad_sidecar_settings(tmp_path):
    r = _module("serve", env={"ADASPEC_SIDECAR_GATE_MARGIN": "-1", "ADASPEC_SIDECAR_STATE_DIR": str(tmp_path)})
    assert r.returncode == 2 and "ADASPEC_SIDECAR_GATE_MARGIN" in r.stderr
