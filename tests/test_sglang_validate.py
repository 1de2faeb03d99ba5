"""The GPU runbook's CPU-checkable parts: server command lines, the lossless comparison, the table, and the
whole orchestration (start, health wait, stream, stop, report) against a fake SGLang server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adaspec.sglang_ext import validate as v

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_validate_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_validate.sh")], check=True)


def test_launch_args_per_configuration():
    common = ["--model-path", "/m", "--dtype", "float32", "--attention-backend", "triton", "--host", "127.0.0.1",
              "--port", "9"]
    none = v.launch_args("no-spec", "/m", "/h", 9, launcher=["L"])
    assert none[:1] == ["L"] and none[1:11] == common and "--speculative-algorithm" not in none
    atlas = v.launch_args("atlas", "/m", "/h", 9, launcher=["L"])
    assert atlas[atlas.index("--speculative-algorithm") + 1] == "ATLAS"
    assert atlas[atlas.index("--speculative-draft-model-path") + 1] == "/h"
    e3 = v.launch_args("eagle3", "/m", "/h", 9, launcher=["L"], steps=4)
    assert e3[e3.index("--speculative-num-steps") + 1] == "4" and e3[e3.index("--speculative-num-draft-tokens") + 1] == "5"
    ad = v.launch_args("eagle3-adaptive", "/m", "/h", 9, launcher=["L"])
    assert "--speculative-adaptive" in ad and ad[ad.index("--speculative-algorithm") + 1] == "EAGLE3"
    ng = v.launch_args("ngram", "/m", "/h", 9, launcher=["L"])
    assert ng[ng.index("--speculative-algorithm") + 1] == "NGRAM"
    for cmd in (none, atlas, e3, ad, ng):  # every configuration computes prompts the same way
        assert "--disable-radix-cache" in cmd and "--enable-metrics" in cmd
    with pytest.raises(ValueError, match="unknown configuration"):
        v.spec_args("medusa", "/h")


def result(config, outputs, tokens=100, verify=0, wall=1.0, error=None):
    return v.ConfigResult(config, ["x"], dict(outputs), tokens, verify, wall, error)


def test_compare_and_table():
    ref = result("no-spec", {"a": "x", "b": "y"}, tokens=100, wall=2.0)
    good = result("atlas", {"a": "x", "b": "y"}, tokens=100, verify=40, wall=1.0)
    bad = result("ngram", {"a": "x", "b": "z"}, tokens=100, verify=80, wall=1.6)
    failed = result("eagle3", {}, error="RuntimeError: boom")
    assert v.compare(ref.outputs, good.outputs) == (2, 2, [])
    assert v.compare(ref.outputs, {"a": "x"}) == (1, 2, ["b"])
    t = v.table([ref, good, bad, failed])
    assert "| no-spec | 50.0 | 1.00x | 1.00 | reference |" in t
    assert "| atlas | 100.0 | 2.00x | 2.50 | 2/2 |" in t
    assert "| ngram | 62.5 | 1.25x | 1.25 | 1/2 (differ: b) |" in t
    assert "| eagle3 | failed: RuntimeError: boom |" in t
    assert not v.lossless_ok([ref, good, bad]) and v.lossless_ok([ref, good])
    assert not v.lossless_ok([good])  # no reference: nothing is proven


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(tmp_path, monkeypatch, **env):
    for k, val in env.items():
        monkeypatch.setenv(k, val)
    monkeypatch.setattr(v, "drift_stream", lambda per_phase, data_dir=None: [
        (f"p{i}", f"what is {i} plus {i} ?") for i in range(per_phase * 5)])
    out = tmp_path / "gpu-results.md"
    rc = v.main(["--model", "/m", "--head", "/h", "--out", str(out), "--per-phase", "2", "--raw",
                 "--port", str(free_port()), "--start-timeout", "60",
                 "--launcher", f"{sys.executable} {ROOT / 'tests' / 'fake_sglang_server.py'}"])
    return rc, out


def test_orchestration_against_a_fake_server(tmp_path, monkeypatch):
    rc, out = run_main(tmp_path, monkeypatch)
    text = out.read_text()
    assert rc == 0 and "every configuration produced exactly the no-spec outputs" in text
    for c in v.CONFIGS:
        assert f"| {c} |" in text and "sglang_server.py --model-path /m" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    by = {r["config"]: r for r in raw["results"]}
    assert by["atlas"]["tau"] == pytest.approx(by["atlas"]["tokens"] / by["atlas"]["verify_ct"])
    assert len(by["atlas"]["outputs"]) == 10 and raw["meta"]["stream_requests"] == 10


def test_orchestration_reports_divergence_and_crashes(tmp_path, monkeypatch):
    rc, out = run_main(tmp_path, monkeypatch, FAKE_DIVERGE="NGRAM", FAKE_CRASH="ATLAS")
    text = out.read_text()
    assert rc == 1 and "NOT all outputs identical" in text
    assert "| ngram |" in text and "differ: p" in text
    assert "| atlas | failed: RuntimeError: server exited with 3" in text
