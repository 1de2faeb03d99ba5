"""The GPU validation harness on CPU: server command lines and env, the comparison, the verdict rule and the
report, process-group and GPU-memory waits, and whole runs (preflight -> atlas -> no-spec -> eagle3) against
tests/fake_sglang_server.py; plus scripts/gpu_validate.sh's exit codes on an unready machine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adaspec.sglang_ext import validate as v

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_validate.sh"
FAKE = ROOT / "tests" / "fake_sglang_server.py"
no_gpu = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="needs a machine without nvidia-smi")


# -- the script -------------------------------------------------------------------------------------------------


def test_gpu_validate_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _script(tmp_path, path: str, **env) -> subprocess.CompletedProcess:
    out = tmp_path / "res" / "gpu-results.md"
    e = {"PATH": path, "HOME": str(tmp_path), "OUT": str(out), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=e, capture_output=True, text=True, timeout=60)


@no_gpu
def test_script_without_gpu_exits_2_and_logs_it(tmp_path):
    p = _script(tmp_path, "/usr/bin:/bin", PYTHON=sys.executable)
    assert p.returncode == 2, p.stdout + p.stderr
    log = (tmp_path / "res" / "gpu-results.log").read_text()
    assert "no NVIDIA GPU" in log and "exit 2" in log


def test_script_model_fetch_failure_exits_2_not_1(tmp_path):
    """F13: offline, a model that is not cached must mean 'machine not ready' (2), not 'outputs differ' (1)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/bash\necho 'GPU 0: Fake H200 (UUID: GPU-0)'\n")
    (bin_ / "python").write_text(
        "#!/bin/bash\n"
        'case "$*" in\n'
        '  *"models fetch"*) echo "ConnectionError: pypi.org unreachable" >&2; exit 1;;\n'
        "  -) cat >/dev/null; exit 0;;\n"  # the sglang/entry-point check passes
        "esac\n"
        "exit 1\n")  # resolving the model from the cache fails
    for f in bin_.iterdir():
        f.chmod(0o755)
    p = _script(tmp_path, f"{bin_}:/usr/bin:/bin", PYTHON=str(bin_ / "python"))
    assert p.returncode == 2, p.stdout + p.stderr
    log = (tmp_path / "res" / "gpu-results.log").read_text()
    assert "model fetch failed" in log and "pypi.org unreachable" in log


# -- command lines and env --------------------------------------------------------------------------------------


def args(*extra: str):
    return v.parse_args(["--model", "/m", "--head", "/h", "--port", "9", *extra])


def test_launch_args_common_flags_and_scheduling():
    a = args()
    common = ["--dtype", "float32", "--attention-backend", "triton", "--max-running-requests", "8",
              "--cuda-graph-max-bs-decode", "8", "--disable-prefill-cuda-graph", "--chunked-prefill-size", "512",
              "--disable-radix-cache", "--enable-metrics", "--log-level", "info"]
    cmds = {c: v.launch_args(c, a, ["L"]) for c in v.CONFIGS}
    for c, cmd in cmds.items():
        assert cmd[:7] == ["L", "--model-path", "/m", "--host", "127.0.0.1", "--port", "9"]
        assert cmd[7:7 + len(common)] == common, c
        assert ("--disable-overlap-schedule" in cmd) == (not v.CONFIGS[c].overlap), c
    atlas = cmds["atlas"]
    assert atlas[atlas.index("--speculative-algorithm") + 1] == "ATLAS"
    assert atlas[atlas.index("--speculative-draft-model-path") + 1] == "/h"
    assert "--speculative-num-steps" not in atlas  # ATLAS sizes it from its candidate steps
    e3 = cmds["eagle3"]
    assert [e3[e3.index(f) + 1] for f in ("--speculative-algorithm", "--speculative-num-steps",
                                          "--speculative-num-draft-tokens", "--speculative-eagle-topk")] == \
        ["EAGLE3", "3", "4", "1"]
    assert "--disable-overlap-schedule" not in cmds["eagle3-overlap"]
    assert "--speculative-adaptive" in cmds["eagle3-adaptive"]
    assert v.CONFIGS["atlas"].scheduling() == v.CONFIGS["eagle3"].scheduling() == "overlap off"
    assert "--speculative-algorithm" not in cmds["no-spec"]
    assert v.DEFAULT_RUN == ("atlas", "no-spec", "eagle3")
    with pytest.raises(SystemExit):
        args("--configs", "medusa")
    assert args("--configs", "ngram,eagle3-overlap").extra_configs == ["ngram", "eagle3-overlap"]


def test_server_env_numerics_for_everyone_plugin_knobs_for_atlas(tmp_path):
    atlas_env = {"ADASPEC_SGLANG_CANDIDATE_STEPS": "0,1,3,8", "ADASPEC_SGLANG_SIDECAR": "false"}
    e = v.server_env("eagle3", tmp_path / "t1", atlas_env)
    assert e == {"TRITON_F32_DEFAULT": "ieee", "TRITON_CACHE_DIR": str(tmp_path / "t1")}
    a = v.server_env("atlas", tmp_path / "t2", atlas_env)
    assert a["TRITON_F32_DEFAULT"] == "ieee" and a["ADASPEC_SGLANG_SIDECAR"] == "false"


# -- pieces -----------------------------------------------------------------------------------------------------


def test_first_difference_and_context():
    assert v.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert v.first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert v.first_difference([1, 2, 3], [1, 2]) == 2  # stopped early
    ids = list(range(30))
    assert v.show_context(ids, 15, None) == f"{list(range(5, 15))} >>> {list(range(15, 25))}"
    assert v.show_context(ids, 2, None) == "[0, 1] >>> " + str(list(range(2, 12)))


def test_wait_gpu_released_polls_back_to_baseline():
    seq = iter([9000.0, 6000.0, 1500.0])
    msg = v.wait_gpu_released(1000.0, 5.0, read=lambda: next(seq), poll=0.0)
    assert msg.startswith("GPU memory released") and "1500.0 MiB" in msg
    stuck = v.wait_gpu_released(1000.0, 0.05, read=lambda: 9000.0, poll=0.01)
    assert stuck.startswith("GPU memory NOT released")
    assert "skipped" in v.wait_gpu_released(None, 5.0)


def test_metrics_and_log_fallbacks():
    metrics = ('adaspec_sglang_state_switches_total{worker="0"} 3\nadaspec_sglang_state_switches_total{worker="1"} 4\n'
               "adaspec_sglang_state_switches_totalx 100\nsglang:foo 1\n")
    assert v.metric_total(metrics, "adaspec_sglang_state_switches_total") == 7
    assert v.adaspec_lines(metrics) == metrics.splitlines()[:3]
    log = "x\nSwitch adaptive runtime state: a\nadaspec ATLAS: verify hook failed (1 so far)\nplanning failed\n"
    assert v.counter(metrics, "adaspec_sglang_state_switches_total", log, v.SWITCH_LINE) == (
        7, "metric adaspec_sglang_state_switches_total")
    assert v.counter("", "adaspec_sglang_glue_errors_total", log, v.GLUE_LINE)[0] == 2
    assert v.effective_scheduling("server_args=ServerArgs(disable_overlap_schedule=True)", "x") == "overlap off"
    assert v.effective_scheduling("", "overlap on") == "overlap on (requested)"
    counts = v.log_counts("Capture target verify CUDA graph end. x\nCapture draft decode CUDA graph end.\nTraceback")
    assert counts["graph captures"] == 2 and counts["tracebacks"] == 1 and counts["ATLAS worker"] == 0


def test_port_busy_sees_a_listening_server():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        assert v.port_busy(f"http://127.0.0.1:{srv.getsockname()[1]}")
    assert not v.port_busy(f"http://127.0.0.1:{free_port()}")


def test_long_prompt_reaches_its_token_count():
    words = lambda s: len(s.split())  # noqa: E731
    text = v.long_prompt(1500, words)
    assert 1500 <= words(text) < 1700 and text == v.long_prompt(1500, words)


# -- verdict and report -----------------------------------------------------------------------------------------


def out(pid, ids, verify=0):
    return v.Output(pid, " ".join(map(str, ids)), list(ids), len(ids), verify, 10)


REF = {f"p{i}": list(range(i, i + 20)) for i in range(4)}


def res(config, changes=(), error=None, wall=1.0, sampling=None):
    ids = {k: list(x) for k, x in REF.items()}
    for pid, at in changes:
        ids[pid][at] += 1000
    verify = 0 if config == "no-spec" else 8
    r = v.ConfigResult(config, ["x"], {}, v.CONFIGS[config].scheduling(),
                       {k: out(k, x, verify) for k, x in ids.items()}, wall_s=wall, error=error)
    r.sampling = sampling or {}
    return r


def judge(results, rerun=None, ties=None, margin=0.02):
    divs = v.divergences(results, None, rerun or {}, ties or {}, margin)
    return divs, v.verdict(results, divs)


def test_verdict_lossless():
    _, vd = judge([res("atlas"), res("no-spec"), res("eagle3")])
    assert (vd.label, vd.exit_code) == ("lossless", 0)


def test_verdict_up_to_numerics_when_eagle3_diverges_on_the_same_prompt():
    divs, vd = judge([res("atlas", [("p1", 7)]), res("no-spec"), res("eagle3", [("p1", 3)])])
    assert (vd.label, vd.exit_code) == ("lossless up to numerics", 0)
    d = next(d for d in divs if d.config == "atlas")
    assert (d.prompt, d.index, d.eagle3_index) == ("p1", 7, 3) and "EAGLE-3 also differs" in d.explained_by[0]


def test_verdict_up_to_numerics_at_a_near_tie_or_a_flaky_reference():
    tie = v.TieProbe(7, [(REF["p1"][7], -0.5), (REF["p1"][7] + 1000, -0.505)], REF["p1"][7], REF["p1"][7] + 1000)
    _, vd = judge([res("atlas", [("p1", 7)]), res("no-spec"), res("eagle3")], ties={"p1": tie})
    assert vd.label == "lossless up to numerics" and "near tie" in vd.reasons[0]
    _, vd = judge([res("atlas", [("p1", 7)]), res("no-spec"), res("eagle3")], ties={"p1": tie}, margin=0.001)
    assert vd.label == "NOT lossless"  # the same margin is no tie under a tighter bound
    far = v.TieProbe(7, [(REF["p1"][7], -0.5), (5, -0.501)], REF["p1"][7], REF["p1"][7] + 1000)
    _, vd = judge([res("atlas", [("p1", 7)]), res("no-spec"), res("eagle3")], ties={"p1": far})
    assert vd.label == "NOT lossless"  # ATLAS's token is not in no-spec's top-2
    _, vd = judge([res("atlas", [("p1", 7)]), res("no-spec"), res("eagle3")], rerun={"p1": 9})
    assert vd.label == "lossless up to numerics" and "rerun" in vd.reasons[0]


def test_verdict_not_lossless_and_failures():
    _, vd = judge([res("atlas", [("p1", 7), ("p2", 0)]), res("no-spec"), res("eagle3", [("p1", 7)])])
    assert (vd.label, vd.exit_code) == ("NOT lossless", 1) and "p2@0" in vd.reasons[0] and "p1@7" not in vd.reasons[0]
    crashed = v.ConfigResult("atlas", ["x"], {}, "overlap off", error="RuntimeError: server exited with 3")
    _, vd = judge([crashed, res("no-spec"), res("eagle3")])
    assert (vd.label, vd.exit_code) == ("ATLAS failed", 1)
    no_ref = v.ConfigResult("no-spec", ["x"], {}, "overlap on", error="RuntimeError: boom")
    _, vd = judge([res("atlas"), no_ref, res("eagle3")])
    assert (vd.label, vd.exit_code) == ("no reference", 2)
    bad_sampling = {"temperature": 0.8, "ok": 3, "requests": 4, "results": []}
    _, vd = judge([res("atlas", sampling=bad_sampling), res("no-spec"), res("eagle3")])
    assert (vd.label, vd.exit_code) == ("lossless", 1) and "sampling check" in vd.reasons[1]


def test_table_and_divergence_section():
    results = [res("atlas", [("p1", 7)], wall=0.5), res("no-spec", wall=2.0), res("eagle3", [("p1", 3)], wall=1.0),
               v.ConfigResult("ngram", ["x"], {}, "overlap off", error="RuntimeError: boom")]
    t = v.table(results)
    assert t.splitlines()[0] == ("| configuration | scheduling | tok/s | speedup vs no-spec | tau (tokens/forward) | "
                                 "identical/compared vs no-spec | time to /health (s) |")
    assert "| atlas | overlap off | 160.0 | 4.00x | 2.50 | 3/4 | - |" in t
    assert "| no-spec | overlap on | 40.0 | 1.00x | 1.00 | reference | - |" in t
    assert "| eagle3 | overlap off | 80.0 | 2.00x | 2.50 | 3/4 | - |" in t
    assert "| ngram | overlap off | failed: RuntimeError: boom |" in t
    divs, _ = judge(results)
    sec = "\n".join(v.divergence_section(divs))
    assert "**atlas** `p1`: first differing token 7; EAGLE-3 differs too (at token 3)" in sec
    assert "**eagle3** `p1`: first differing token 3\n" in sec  # no EAGLE-3 column for EAGLE-3 itself
    assert f"  - no-spec: `` {list(range(1, 8))} >>> {list(range(8, 18))} ``" in sec
    assert f"  - atlas: `` {list(range(1, 8))} >>> {[1008] + list(range(9, 18))} ``" in sec
    divs, _ = judge([res("atlas", [("p2", 4)]), res("no-spec"), res("eagle3")])
    assert "EAGLE-3 identical on this prompt" in "\n".join(v.divergence_section(divs))


# -- whole runs against the fake server -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(tmp_path, monkeypatch, *extra: str, base: bool = True, **env):
    for k, val in env.items():
        monkeypatch.setenv(k, val)
    monkeypatch.setattr(v, "drift_prompts", lambda n, data_dir=None: [(f"p{i}", f"what is {i} plus {i} ?")
                                                                       for i in range(n)])
    out = tmp_path / "gpu-results.md"
    argv = ["--model", "/m", "--head", "/h", "--out", str(out), "--prompts", "6", "--long-prompt-tokens", "300",
            "--max-new-tokens", "16", "--raw", "--allow-unready", "--port", str(free_port()), "--start-timeout",
            "30", "--gpu-release-timeout", "5", "--launcher", f"{sys.executable} {FAKE}", *extra]
    if base:
        (tmp_path / "base.safetensors").write_bytes(b"x")
        argv += ["--adaptive-base", str(tmp_path / "base.safetensors")]
    rc = v.main(argv)
    return rc, out.read_text(), json.loads(out.with_suffix(".json").read_text())


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_run_order_env_and_lossless_report(tmp_path, monkeypatch, capsys):
    envs = tmp_path / "envs"
    envs.mkdir()
    rc, md, raw = run_main(tmp_path, monkeypatch, FAKE_ENV_DIR=str(envs), FAKE_CHILD="1")
    log = capsys.readouterr().out
    assert rc == 0 and "**Verdict: lossless** (exit 0)" in md
    # order: preflight -> atlas -> no-spec -> eagle3, in the log and in the JSON
    marks = [log.index(f"== {p} ==") for p in ("preflight", "atlas", "no-spec", "eagle3", "report")]
    assert marks == sorted(marks)
    assert [p["name"] for p in raw["phases"]][:4] == ["preflight", "atlas", "no-spec", "eagle3"]
    assert [r["config"] for r in raw["results"]] == ["atlas", "no-spec", "eagle3"]
    # every server: IEEE fp32 dot and its own fresh Triton cache; ATLAS: candidate steps, no sidecar, the base
    seen = {a: json.loads((envs / f"{a}.json").read_text()) for a in ("ATLAS", "NONE", "EAGLE3")}
    caches = {a: d["env"]["TRITON_CACHE_DIR"] for a, d in seen.items()}
    assert all(d["env"]["TRITON_F32_DEFAULT"] == "ieee" for d in seen.values()) and len(set(caches.values())) == 3
    atlas_env = seen["ATLAS"]["env"]
    assert atlas_env["ADASPEC_SGLANG_CANDIDATE_STEPS"] == "0,1,3,8" and atlas_env["ADASPEC_SGLANG_SIDECAR"] == "false"
    assert atlas_env["ADASPEC_SGLANG_ADAPTIVE_BASE"] == str(tmp_path / "base.safetensors")
    assert "ADASPEC_SGLANG_CANDIDATE_STEPS" not in seen["EAGLE3"]["env"]
    # the whole process group was stopped, not only the launcher
    assert not any(_alive(d["child"]) for d in seen.values())
    assert log.count("stop: process group gone") == 3
    # what the ATLAS phase prints
    atlas_part = log[log.index("== atlas =="):log.index("== no-spec ==")]
    counts = "graph captures 1, adaptive states built 3, ATLAS worker 1, plugin load failures 0, tracebacks 0"
    assert counts in atlas_part
    assert "meta: completion_tokens 16, spec_verify_ct 6, spec_accept_length 2.66" in atlas_part
    assert "stream: 7/7 requests" in atlas_part and "sampling (temperature 0.8): 4/4 non-empty" in atlas_part
    assert "adaspec_sglang_glue_errors_total 0" in atlas_part
    assert "state switches: 24 (metric adaspec_sglang_state_switches_total)" in atlas_part
    assert "GPU memory used: n/a" in atlas_part
    assert "| atlas | overlap off |" in md and "| no-spec | overlap on |" in md and "| eagle3 | overlap off |" in md
    assert "no-spec rerun: 7/7 identical" in log
    by = {r["config"]: r for r in raw["results"]}
    assert by["atlas"]["tau"] == pytest.approx(by["atlas"]["tokens"] / by["atlas"]["verify_ct"])
    assert max(o["prompt_tokens"] for o in by["no-spec"]["outputs"].values()) > 200  # the long prompt


def test_divergence_also_in_eagle3_is_numerics(tmp_path, monkeypatch, capsys):
    rc, md, raw = run_main(tmp_path, monkeypatch, FAKE_DIVERGE="ATLAS,EAGLE3", FAKE_NO_SWITCH_METRIC="1")
    log = capsys.readouterr().out
    assert rc == 0 and "**Verdict: lossless up to numerics** (exit 0)" in md
    assert "**atlas** `p3`: first differing token 5; EAGLE-3 differs too (at token 5)" in md
    assert "| atlas | overlap off |" in md and "| 6/7 |" in md
    assert "state switches: 24 (log lines" in log  # no metric: counted from the server log


def test_atlas_only_divergence_is_not_lossless_unless_a_near_tie(tmp_path, monkeypatch, capsys):
    rc, md, raw = run_main(tmp_path, monkeypatch, "--no-rerun", FAKE_DIVERGE="ATLAS")
    assert rc == 1 and "**Verdict: NOT lossless** (exit 1)" in md
    assert "EAGLE-3 identical on this prompt" in md and "margin 3" in md
    rc, md, raw = run_main(tmp_path, monkeypatch, "--no-rerun", FAKE_DIVERGE="ATLAS", FAKE_TIE_MARGIN="0.001")
    assert rc == 0 and "**Verdict: lossless up to numerics**" in md and "near tie" in md
    assert raw["divergences"][0]["tie"]["top"][0][1] == -0.5


def test_crashing_atlas_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    rc, md, raw = run_main(tmp_path, monkeypatch, base=False, FAKE_CRASH="ATLAS")
    log = capsys.readouterr().out
    assert rc == 1 and "**Verdict: ATLAS failed** (exit 1)" in md
    assert "| atlas | overlap off | failed: RuntimeError: server exited with 3 before becoming healthy" in md
    assert "    | RuntimeError: fake capture failure" in log  # the server log's tail is in the one log
    by = {r["config"]: r for r in raw["results"]}
    assert by["no-spec"]["tok_s"] > 0 and by["eagle3"]["tok_s"] > 0 and by["atlas"]["log"]["tracebacks"] == 1
    # no base file and the model cannot be loaded here: said clearly, no traceback soup
    assert "[FAIL] adaptive base: could not build from /m" in log
    assert "Traceback" not in log.split("== atlas ==")[0]


def test_atlas_dying_mid_run_is_reported(tmp_path, monkeypatch, capsys):
    rc, md, raw = run_main(tmp_path, monkeypatch, "--no-rerun", FAKE_CRASH="ATLAS@generate")
    assert rc == 1 and "ATLAS failed" in md and "(server exited with 3)" in md
    assert [r["config"] for r in raw["results"]] == ["atlas", "no-spec", "eagle3"]


@no_gpu
def test_unready_machine_exits_2_before_any_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(v, "drift_prompts", lambda n, data_dir=None: [("p0", "hi there")])
    out = tmp_path / "r.md"
    (tmp_path / "b").write_bytes(b"x")
    rc = v.main(["--model", "/m", "--head", "/h", "--out", str(out), "--raw", "--adaptive-base", str(tmp_path / "b"),
                 "--launcher", "false"])
    log = capsys.readouterr().out
    assert rc == 2 and "[FAIL] GPU: nvidia-smi unavailable" in log and "(machine not ready)" in log
    assert "== atlas ==" not in log and json.loads(out.with_suffix(".json").read_text())["verdict"]["exit_code"] == 2
    assert os.path.exists(out)
