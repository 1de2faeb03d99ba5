"""A sidecar spawned by another program dies with it, however that program ends (SIGKILL included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sidecar_helpers import child_pids, cleanup, short_dir

PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from adaspec.core.heads.adaptive import AdaptiveConfig, AdaptiveHead
    from adaspec.core.online.settings import TransportSettings
    from adaspec.sidecar.process import spawn_sidecar

    root = Path(sys.argv[1])
    head = AdaptiveHead(AdaptiveConfig(hidden_size=8, vocab_size=50, inner_size=16), torch.randn(50, 8),
                        torch.randn(50, 8))
    sc = spawn_sidecar(TransportSettings(run_dir=root / "run"), root / "state", head=head, ready_timeout_s=60,
                       colocated=True)
    print(sc.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_spawned_sidecar_dies_with_its_parent(sig):
    root = short_dir("as-orph-")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent did not start a sidecar (exit {parent.poll()})"
        child = int(line)
        assert _alive(child)
        if sig == signal.SIGKILL:  # a co-located sidecar trains only on idle cycles, at a bounded share
            with open(f"/proc/{child}/sched") as f:
                policy = next(int(x.split(":")[1]) for x in f if x.startswith("policy"))
            assert policy == getattr(os, "SCHED_IDLE", 5)
            assert "scheduling SCHED_IDLE, cpu share 0.0033 cores (follows earnings, at most 0.25)" in (root / "state" / "sidecar.log").read_text()
        parent.send_signal(sig)  # SIGKILL: no cleanup of the parent's runs at all
        parent.wait(10)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the sidecar outlived its parent (orphan)"
        assert "parent" in (root / "state" / "sidecar.log").read_text()  # it stopped on purpose, gracefully
    finally:
        if parent.poll() is None:
            parent.kill()
        cleanup(root)



@pytest.mark.model
def test_killing_the_live_drift_benchmark_leaves_no_orphan_sidecar(data_dir):
    """`adaspec bench drift --live --sidecar` killed with SIGKILL mid-run: its sidecar stops too."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "adaspec.core.cli", "bench", "drift", "--live", "--sidecar", "--policy", "adaptive",
         "--phase", f"code={data_dir / 'code_edit.jsonl'}:8", "--max-new-tokens", "256", "--costs", "gpu-small-model"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, sidecar = time.monotonic() + 120, None
        while sidecar is None and time.monotonic() < deadline and bench.poll() is None:
            for c in child_pids(bench.pid):
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    if b"adaspec.sidecar" in f.read():
                        sidecar = c
            time.sleep(0.2)
        assert sidecar is not None, "the benchmark never started its sidecar"
        time.sleep(2.0)  # serving and learning
        bench.kill()
        bench.wait(10)
        deadline = time.monotonic() + 20
        while _alive(sidecar) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(sidecar), "the benchmark's sidecar outlived it (orphan)"
    finally:
        if bench.poll() is None:
            bench.kill()
