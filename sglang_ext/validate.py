"""GPU validation of `--speculative-algorithm ATLAS` in SGLang 0.5.17: one run, <= 10 minutes, one log.

Plan (../shared/design/sglang-audit.md section 4; driven by scripts/gpu_validate.sh, which tees stdout to one
log). Order matters, the most fragile part goes first:

1. preflight (<= 30 s): package versions, `nvidia-smi`, plugin load + `check_hook_points()`, the adaptive
   head base built once (what the sidecar would write, `sidecar/service.py:95`); no GPU or no sglang 0.5.17
   exits 2 before any server starts;
2. ATLAS (`ADASPEC_SGLANG_CANDIDATE_STEPS=0,1,3,8`, no sidecar): time to /health, grep counts of its log, one
   greedy request with its meta_info, the stream, 4 sampled requests, `/metrics` `adaspec_` lines, state
   switches, glue errors, server RSS and GPU memory;
3. no-spec, SGLang's own greedy decoding: the reference (plus, budget permitting, a rerun of the stream --
   the noise floor of the reference itself -- and a top-2 logprob probe at each ATLAS divergence);
4. EAGLE-3 with our static head at the same scheduling mode as ATLAS (overlap off), the numerics control;
   optional configurations only with `--configs`.

The stream: 12 drift-stream prompts (`adaspec.core.drift.stream`) plus one synthetic ~1.5k-token prompt (three
chunks at `--chunked-prefill-size 512`), greedy, `max_new_tokens` 128, concurrency 4 (bs > 1, mixed static and
chain rows). Every output's token ids are compared with no-spec's; the report gives, per differing prompt, the
first differing token, +-10 tokens each side and whether EAGLE-3 differs there too. Verdict on ATLAS:
"lossless" (identical everywhere), "lossless up to numerics" (each divergence is on a prompt where EAGLE-3
also diverges, where the no-spec rerun diverges, or starts at a near tie: top-2 logprob margin below
`--tie-margin`), else "NOT lossless". Exit 0 / 1 / 2 = lossless or up to numerics / not (or ATLAS failed) /
machine not ready (preflight, or SGLang's own no-spec server could not serve).

Numerics (audit F9): every server gets `TRITON_F32_DEFAULT=ieee` and its own fresh `TRITON_CACHE_DIR`:
SGLang's triton attention kernels call `tl.dot` without `input_precision`
(`kernels/ops/attention/extend_attention.py:434,508`, `decode_attention.py`), which Triton then runs as TF32 for
fp32 inputs unless the knob says otherwise (`triton/language/core.py:2284`, `triton/knobs.py:498`, Triton 3.9
as installed here); a fresh cache dir guarantees no TF32 build is reused. Linear layers stay IEEE fp32:
`--enable-tf32-matmul` defaults off for Llama (`srt/server_args.py:753`, only MiniMax/GLM-MoE turn it on in
`srt/arg_groups/overrides.py:701,1346`).

Common server flags, each checked against SGLang 0.5.17's parser (`ServerArgs.add_cli_args`,
`srt/server_args.py:8214`, fields at): `--dtype` (:631), `--attention-backend` (:1643),
`--max-running-requests` (:770), `--cuda-graph-max-bs-decode` (:1823, `--cuda-graph-max-bs` is its deprecated
alias :8316), `--disable-prefill-cuda-graph` (:1848), `--chunked-prefill-size` (:792), `--enable-metrics`
(:1492), `--log-level` (:1442), `--disable-radix-cache` (:923), `--disable-overlap-schedule` (:949), the
`--speculative-*` flags (:2024-2060). `--disable-radix-cache` stays: with the radix cache on, whether a prompt's
shared chat-template prefix is served from the cache depends on arrival order at concurrency 4, which changes the
prefill kernels' inputs (extend over a cached prefix vs. the whole prompt) and so the fp32 rounding of every
configuration independently of speculation; the rerun and the logprob probe also rely on every prompt being
recomputed.

Response shape relied on (`srt/managers/tokenizer_manager.py`): non-streaming /generate returns `text`,
`output_ids`, `meta_info` (:2356-2362) and `prompt_token_ids` when `return_prompt_token_ids` is set
(:797, :2363); meta_info has `prompt_tokens` (:2218), `completion_tokens` (:2264) and, only when
`spec_verify_ct > 0`, `spec_verify_ct` and `spec_accept_length` (:2436 -> :2750-2773); with `return_logprob`
and `top_logprobs_num`, `meta_info.output_top_logprobs` is one list per output token of
`[logprob, token_id, text|null]` (:2578-2586, :2699-2717; `logprob_start_len` unset = output tokens only,
`managers/io_struct.py:206`). /health answers 503 until the server finished its warm-up
(`srt/entrypoints/http_server.py:646-666`). The log lines counted come from
`model_runner_components/cuda_graph_setup.py:374,452` and `speculative/eagle_worker_v2.py:384,479`
(`Capture ... end`), `eagle_worker_v2.py:1370,1384` (`Built adaptive runtime state`, `Switch adaptive runtime
state`), `plugins/__init__.py:84,136` (plugin failures); the effective scheduling mode from the
`server_args=ServerArgs(...)` line (`srt/entrypoints/engine.py:1059`, logged after validation).

Everything but starting a real server is HTTP, /proc and arithmetic: it runs (and is tested) on CPU against
tests/fake_sglang_server.py (`--launcher`, `--allow-unready`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REFERENCE = "no-spec"
DEFAULT_RUN = ("atlas", REFERENCE, "eagle3")  # this order: ATLAS is the most likely to fail
EAGLE3 = "eagle3"
ATLAS = "atlas"
GPU_FREE_TOLERANCE_MIB = 1024.0
CONTEXT_TOKENS = 10


def say(msg: str = "") -> None:
    """Everything goes to stdout (the script tees it into the one log), flushed so a hang shows where."""
    print(msg, flush=True)


# -- configurations -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """One server: its speculative flags and the scheduling mode it runs in (`overlap` False = the
    `--disable-overlap-schedule` path ATLAS always takes, `sglang_ext/spec.py:68-72`)."""

    name: str
    flags: Callable[[str, int], list[str]]  # (static head dir, EAGLE-3 steps) -> flags
    overlap: bool
    atlas: bool = False  # gets the ATLAS env and the sampling check
    speculative: bool = True  # reports state switches and glue errors

    def scheduling(self) -> str:
        return "overlap on" if self.overlap else "overlap off"


def _eagle3(head: str, steps: int) -> list[str]:
    return ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", head,
            "--speculative-num-steps", str(steps), "--speculative-num-draft-tokens", str(steps + 1),
            "--speculative-eagle-topk", "1"]


_OFF = ["--disable-overlap-schedule"]
CONFIGS: dict[str, ServerConfig] = {c.name: c for c in (
    ServerConfig(ATLAS, lambda h, s: ["--speculative-algorithm", "ATLAS", "--speculative-draft-model-path", h,
                                      *_OFF], overlap=False, atlas=True),
    ServerConfig(REFERENCE, lambda h, s: [], overlap=True, speculative=False),
    ServerConfig(EAGLE3, lambda h, s: _eagle3(h, s) + _OFF, overlap=False),
    # optional (--configs): EAGLE-3 as SGLang runs it by default, its adaptive mode, NGRAM
    ServerConfig("eagle3-overlap", _eagle3, overlap=True),
    ServerConfig("eagle3-adaptive", lambda h, s: ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path",
                                                  h, "--speculative-eagle-topk", "1", "--speculative-adaptive",
                                                  *_OFF], overlap=False),
    ServerConfig("ngram", lambda h, s: ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens",
                                        str(2 * s + 2), *_OFF], overlap=False),
)}
OPTIONAL = tuple(n for n in CONFIGS if n not in DEFAULT_RUN)


def common_flags(a: argparse.Namespace) -> list[str]:
    """Flags every server shares, so prefill chunking, batch limits and kernels match across configurations."""
    return ["--dtype", a.dtype, "--attention-backend", a.attention_backend,
            "--max-running-requests", str(a.max_running_requests),
            "--cuda-graph-max-bs-decode", str(a.max_running_requests), "--disable-prefill-cuda-graph",
            "--chunked-prefill-size", str(a.chunked_prefill_size), "--disable-radix-cache", "--enable-metrics",
            "--log-level", "info"]


def launch_args(config: str, a: argparse.Namespace, launcher: Sequence[str]) -> list[str]:
    """The full server command line of one configuration."""
    spec = CONFIGS[config]
    return [*launcher, "--model-path", a.model, "--host", "127.0.0.1", "--port", str(a.port), *common_flags(a),
            *spec.flags(a.head, a.eagle_steps), *shlex.split(a.extra)]


def server_env(config: str, triton_cache: Path, atlas_env: dict[str, str]) -> dict[str, str]:
    """The additions to the environment of one server: IEEE fp32 `tl.dot` from a fresh Triton cache for
    everyone (audit F9), the plugin's knobs for ATLAS (`sglang_ext/settings.py`, env prefix ADASPEC_SGLANG_)."""
    env = {"TRITON_F32_DEFAULT": "ieee", "TRITON_CACHE_DIR": str(triton_cache)}
    if CONFIGS[config].atlas:
        env.update(atlas_env)
    return env


# -- phases and the budget ----------------------------------------------------------------------------------


class Clock:
    """Wall time per phase and in total; optional work is skipped once the budget is spent."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.phases: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.elapsed()
        say(f"\n== {name} == (t={start:.1f} s)")
        try:
            yield
        finally:
            took = self.elapsed() - start
            self.phases.append({"name": name, "start_s": round(start, 2), "elapsed_s": round(took, 2)})
            say(f"-- {name}: {took:.1f} s (total {self.elapsed():.1f} s)")

    def optional(self, what: str) -> bool:
        """True when there is budget left for `what`; says so when it is skipped."""
        if self.over_budget():
            say(f"  skipped {what}: budget of {self.budget_s:.0f} s spent ({self.elapsed():.0f} s)")
            return False
        return True


# -- preflight ----------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool = False  # the machine is not ready (exit 2)


#: Run in the server's interpreter: one JSON line per item, so a failure names itself and the rest still run.
PROBE = r"""
import json, sys
from importlib.metadata import PackageNotFoundError, version
def emit(name, ok, detail):
    print(json.dumps({"name": name, "ok": bool(ok), "detail": str(detail)[:400]}), flush=True)
def dist(names):
    for n in names:
        try:
            return version(n)
        except PackageNotFoundError:
            pass
for label, names in (("sglang", ["sglang"]), ("torch", ["torch"]), ("sgl_kernel", ["sglang-kernel", "sgl-kernel"]),
                     ("flashinfer", ["flashinfer-python", "flashinfer_python", "flashinfer"]),
                     ("transformers", ["transformers"])):
    v = dist(names)
    emit("version " + label, v is not None, v or "not installed")
try:
    if "--no-gpu" in sys.argv:
        raise RuntimeError("skipped: no GPU listed by nvidia-smi")
    import torch
    emit("torch cuda", torch.cuda.is_available(),
         f"torch.version.cuda {torch.version.cuda}, cuda available {torch.cuda.is_available()}, "
         f"{torch.cuda.device_count()} device(s)")
except Exception as e:
    emit("torch cuda", False, f"{type(e).__name__}: {e}")
try:
    from adaspec.sglang_ext.plugin import load
    load()
    emit("plugin load", True, "adaspec.sglang_ext.plugin:load() registered ATLAS")
except Exception as e:
    emit("plugin load", False, f"{type(e).__name__}: {e}")
try:
    from adaspec.sglang_ext.hooks import check_hook_points
    emit("hook points", True, f"{len(check_hook_points())} SGLang hook points checked")
except Exception as e:
    emit("hook points", False, f"{type(e).__name__}: {e}")
"""

#: Builds the adaptive head base the way the sidecar does on first start (sidecar/service.py:95).
BUILD_BASE = r"""
import sys
from pathlib import Path
from adaspec.core.heads.adaptive_base import base_from_model
from adaspec.sidecar.settings import load_sidecar_settings
s = load_sidecar_settings()
b = base_from_model(Path(sys.argv[1]), s.inner_size, s.seed)
print(f"vocab {b.config.vocab_size}, hidden {b.config.hidden_size}, inner {b.config.inner_size}")
"""


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else ""


def nvidia_smi_checks() -> list[Check]:
    """`nvidia-smi -L` and the driver/memory of each GPU; missing = fatal (no GPU, nothing to validate)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Check("GPU", False, f"nvidia-smi unavailable ({type(exc).__name__}: {exc})", fatal=True)]
    if listing.returncode != 0 or not listing.stdout.strip():
        return [Check("GPU", False, f"nvidia-smi -L failed: {_last_line(listing.stderr + listing.stdout)}",
                      fatal=True)]
    return [Check("GPU", True, listing.stdout.strip().replace("\n", "; ")),
            Check("GPU driver/memory", query.returncode == 0, query.stdout.strip().replace("\n", "; "))]


def parse_probe(stdout: str) -> list[Check]:
    """The probe's JSON lines; sglang missing or not 0.5.17 is fatal (the plugin refuses anything else)."""
    checks = []
    for line in stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        c = Check(d["name"], d["ok"], d["detail"])
        if c.name == "version sglang":
            c.ok = c.ok and c.detail == "0.5.17"
            c.fatal = not c.ok
        checks.append(c)
    return checks


def run_probe(python: str, gpu: bool) -> subprocess.Popen:
    """Start the probe in the servers' interpreter (it imports SGLang: seconds, so it runs alongside the base
    build); without a GPU it does not import torch to ask CUDA."""
    return subprocess.Popen([python, "-c", PROBE, *([] if gpu else ["--no-gpu"])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_base_build(python: str, model: str, dest: Path) -> subprocess.Popen:
    """Start building the adaptive head base from the target (CPU, seconds for SmolLM2-135M)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ADASPEC_MODEL=model)
    return subprocess.Popen([python, "-c", BUILD_BASE, str(dest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """(rc, stdout, stderr) of a preflight subprocess; rc -9 after the timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -9, out, err + f"\ntimed out after {timeout:.0f} s"


def preflight(a: argparse.Namespace, base_path: Path) -> tuple[list[Check], bool]:
    """Every preflight item and whether the adaptive base is ready. The probe (SGLang import) and the base
    build run side by side; the items are printed together once both are done."""
    checks = nvidia_smi_checks()
    probe = run_probe(a.python, gpu=checks[0].ok)
    build = None
    if base_path.is_file() and a.adaptive_base:
        base = Check("adaptive base", True, f"using existing {base_path}")
    else:
        build = start_base_build(a.python, a.model, base_path)
    rc, out, err = finish(probe, a.preflight_timeout)
    checks += parse_probe(out)
    if rc != 0:
        checks.append(Check("probe", False, f"exited {rc}: {_last_line(err)}"))
    if not any(c.name == "version sglang" for c in checks):
        checks.append(Check("version sglang", False, f"unknown: the probe did not run ({_last_line(err)})",
                            fatal=True))
    if build is not None:
        rc, out, err = finish(build, a.preflight_timeout)
        base = Check("adaptive base", rc == 0 and base_path.is_file(),
                     f"built {base_path} ({_last_line(out)})" if rc == 0 else
                     f"could not build from {a.model}: {_last_line(err)} -- ATLAS runs without the adaptive drafter")
    checks.append(base)
    for c in checks:
        say(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" + ("  (machine not ready)" if c.fatal else ""))
    return checks, base.ok


# -- prompts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # as sent: chat template applied unless --raw


#: Used only when the drift-stream datasets are not on the machine (../shared/data or ADASPEC_DATA_DIR).
FALLBACK_PROMPTS = (
    "Explain why the sky is blue to a ten-year-old.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "What is 17 times 23? Show your steps.",
    "Give three tips for writing clear emails.",
    "Write a haiku about autumn rain.",
    "Refactor this loop into a list comprehension: result = []\nfor x in range(10):\n    result.append(x * x)",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "Summarize the plot of Romeo and Juliet in four sentences.",
    "Write a JavaScript function that checks whether a string is a palindrome.",
    "What are the main differences between TCP and UDP?",
    "If a shirt costs $25 after a 20% discount, what was the original price?",
    "Describe how a hash map works.",
)


def spread(n: int, parts: int) -> list[int]:
    """n split over `parts` as evenly as possible, earlier parts first (12 over 5 phases: 3,3,2,2,2)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def drift_prompts(n: int, data_dir: Path | None = None) -> list[tuple[str, str]]:
    """(id, prompt) of n drift-stream prompts spread over its phases (chat -> code -> edits -> math -> chat)."""
    from adaspec.core.drift.stream import build_stream, default_phases

    phases = default_phases(32, data_dir)
    phases = [dataclasses.replace(p, count=c) for p, c in zip(phases, spread(n, len(phases))) if c > 0]
    return [(f"{r.phase}/{r.prompt_id}", r.prompt) for r in build_stream(phases)]


def stream_prompts(n: int) -> list[tuple[str, str]]:
    """The drift stream, or the built-in prompts (said so) when its datasets are missing."""
    try:
        return drift_prompts(n)
    except Exception as exc:
        say(f"  [FAIL] drift stream: {type(exc).__name__}: {exc} -- using {min(n, len(FALLBACK_PROMPTS))} "
            "built-in prompts")
        return [(f"builtin/{i}", p) for i, p in enumerate(FALLBACK_PROMPTS[:n])]


_STORES = ("north", "south", "east", "west", "harbor", "hill", "river")
_GOODS = ("apples", "bolts", "cables", "drums", "engines", "fabric", "glass", "honey", "ink", "jars", "keys")


def long_prompt(target_tokens: int, count: Callable[[str], int] | None) -> str:
    """A deterministic ~target_tokens prompt (an inventory log and a question about it): several prefill
    chunks at --chunked-prefill-size 512 (audit F1). `count` is the model's tokenizer; chars/4 without one."""
    count = count or (lambda s: len(s) // 4)
    head = "Below is a warehouse inventory log. Read it carefully, then answer the question after it.\n"
    tail = "\nQuestion: which warehouse received the most crates in total, and of which goods? Answer briefly."
    lines: list[str] = []
    while True:
        for _ in range(8):
            i = len(lines) + 1
            lines.append(f"Entry {i}: the {_STORES[i % 7]} warehouse received {(i * 37) % 91 + 9} crates of "
                         f"{_GOODS[i % 11]} on day {(i * 13) % 28 + 1}.")
        text = head + "\n".join(lines) + tail
        if count(text) >= target_tokens:
            return text


def load_tokenizer(model: str) -> Any | None:
    """The model's tokenizer from the local dir (no network), or None (ids are shown instead of text)."""
    if not (Path(model) / "config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as exc:
        say(f"  [FAIL] tokenizer: {type(exc).__name__}: {exc}")
        return None


def build_prompts(a: argparse.Namespace, tok: Any | None) -> list[Prompt]:
    """The stream: drift prompts with the long prompt second (it is prefilled in chunks while others decode)."""
    rows = stream_prompts(a.prompts)
    count = (lambda s: len(tok(s)["input_ids"])) if tok is not None else None
    rows.insert(min(1, len(rows)), ("synthetic/long", long_prompt(a.long_prompt_tokens, count)))
    if a.raw or tok is None:
        if not a.raw:
            say("  [FAIL] chat template: no tokenizer for the model; prompts sent raw")
        return [Prompt(pid, text) for pid, text in rows]
    return [Prompt(pid, tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)) for pid, text in rows]


# -- HTTP ---------------------------------------------------------------------------------------------------


def post(url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode(errors="replace")


def port_busy(base: str) -> bool:
    """Something already answers on the server's port (a leftover server would be measured instead)."""
    host, port = base.rsplit("/", 1)[-1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until /health answers 200 (SGLang: after its warm-up); RuntimeError if the server exits or
    `timeout` passes."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server at {base} not healthy after {timeout:.0f} s")


@dataclass
class Output:
    id: str
    text: str
    ids: list[int]
    tokens: int  # meta_info.completion_tokens
    verify_ct: int  # meta_info.spec_verify_ct: target forwards of the decode (0 without speculation)
    prompt_tokens: int
    accept_length: float | None = None  # meta_info.spec_accept_length
    prompt_ids: list[int] | None = field(default=None, repr=False)  # only when asked (reference)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("prompt_ids")
        return d


def parse_output(pid: str, r: dict[str, Any]) -> Output:
    """One /generate response (shape: module docstring)."""
    meta = r.get("meta_info") or {}
    ids = [int(t) for t in r.get("output_ids") or []]
    acc = meta.get("spec_accept_length")
    prompt_ids = r.get("prompt_token_ids")
    return Output(pid, r.get("text") or "", ids, int(meta.get("completion_tokens", len(ids)) or 0),
                  int(meta.get("spec_verify_ct") or 0), int(meta.get("prompt_tokens") or 0),
                  float(acc) if acc is not None else None, [int(t) for t in prompt_ids] if prompt_ids else None)


def generate(base: str, p: Prompt, max_new_tokens: int, timeout: float, temperature: float = 0.0,
             prompt_ids: bool = False) -> Output:
    payload: dict[str, Any] = {"text": p.text, "sampling_params": {"temperature": temperature,
                                                                   "max_new_tokens": max_new_tokens}}
    if prompt_ids:
        payload["return_prompt_token_ids"] = True
    return parse_output(p.id, post(base + "/generate", payload, timeout))


@dataclass
class StreamRun:
    outputs: dict[str, Output]
    errors: dict[str, str]
    wall_s: float


def serve_stream(base: str, prompts: Sequence[Prompt], max_new_tokens: int, concurrency: int, timeout: float,
                 prompt_ids: bool = False) -> StreamRun:
    """The prompts greedily at `concurrency` in flight, every output kept; a failed request is recorded, the
    others go on."""

    def one(p: Prompt) -> tuple[str, Output | str]:
        try:
            return p.id, generate(base, p, max_new_tokens, timeout, prompt_ids=prompt_ids)
        except Exception as exc:
            return p.id, f"{type(exc).__name__}: {exc}"[:300]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    return StreamRun({k: o for k, o in done if isinstance(o, Output)},
                     {k: o for k, o in done if isinstance(o, str)}, wall)


@dataclass
class TieProbe:
    """No-spec's top-2 at the first token where a configuration left the reference."""

    index: int
    top: list[tuple[int, float]]  # (token id, logprob), best first
    ref_token: int
    got_token: int | None
    error: str | None = None

    @property
    def margin(self) -> float | None:
        return self.top[0][1] - self.top[1][1] if len(self.top) >= 2 else None

    def describe(self) -> str:
        if self.error is not None:
            return f"top-2 probe failed: {self.error}"
        if self.margin is None:
            return f"top-2 unavailable (got {self.top})"
        return f"no-spec top-2 {self.top} (margin {self.margin:.4g})"

    def near(self, bound: float) -> bool:
        """A near tie: the two diverging tokens are no-spec's top-2 and their logprobs are within `bound`."""
        m = self.margin
        return (m is not None and m < bound and {self.ref_token, self.got_token} <= {t for t, _ in self.top[:2]})


def probe_tie(base: str, ref: Output, got: Output | None, index: int, timeout: float) -> TieProbe:
    """One no-spec request on the reference prefix up to `index` with `top_logprobs_num` 2."""
    got_token = got.ids[index] if got is not None and index < len(got.ids) else None
    ref_token = ref.ids[index] if index < len(ref.ids) else -1
    if not ref.prompt_ids:
        return TieProbe(index, [], ref_token, got_token, "no prompt_token_ids from the reference")
    payload = {"input_ids": ref.prompt_ids + ref.ids[:index], "return_logprob": True, "top_logprobs_num": 2,
               "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}}
    try:
        r = post(base + "/generate", payload, timeout)
        first = (r.get("meta_info") or {}).get("output_top_logprobs")[0]
        top = sorted(((int(e[1]), float(e[0])) for e in first), key=lambda t: -t[1])
        return TieProbe(index, top, ref_token, got_token)
    except Exception as exc:
        return TieProbe(index, [], ref_token, got_token, f"{type(exc).__name__}: {exc}"[:200])


# -- server process, logs, metrics --------------------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc; the launcher's own pid when /proc is
    missing and the group still exists."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    pids = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if rest[0] != "Z" and int(rest[2]) == pgid:
            pids.append(int(d.name))
    return pids


def group_rss_mib(pgid: int) -> float | None:
    """Resident memory of the server's whole process tree (launcher, tokenizer, scheduler, detokenizer)."""
    total, seen = 0, False
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    for pid in group_pids(pgid):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            seen = True
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20 if seen else None


def stop_server(proc: subprocess.Popen, term_s: float = 30.0, kill_s: float = 15.0) -> str:
    """SIGTERM the whole process group, wait until every process of it is gone (not just the launcher:
    SGLang's scheduler holds the GPU memory), SIGKILL what is left after `term_s`."""
    pgid = proc.pid
    t0 = time.monotonic()
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the launcher
            if not group_pids(pgid):
                return f"process group gone after {time.monotonic() - t0:.1f} s ({sig.name})"
            time.sleep(0.1)
    return f"process group {pgid} still has {len(group_pids(pgid))} process(es) after SIGKILL"


def gpu_mem_used_mib() -> float | None:
    """memory.used of the GPU the servers run on (first of CUDA_VISIBLE_DEVICES, else 0); None without
    nvidia-smi (CPU)."""
    dev = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    try:
        r = subprocess.run(["nvidia-smi", "-i", dev, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return float(r.stdout.strip().splitlines()[0]) if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def wait_gpu_released(baseline: float | None, timeout: float, read: Callable[[], float | None] = gpu_mem_used_mib,
                      tolerance: float = GPU_FREE_TOLERANCE_MIB, poll: float = 0.5) -> str:
    """Wait until the GPU's used memory is back within `tolerance` MiB of the pre-start baseline, so the next
    server sizes its KV pool from the whole GPU (audit F10)."""
    if baseline is None:
        return "GPU memory wait skipped (no nvidia-smi)"
    t0 = time.monotonic()
    used = read()
    while used is not None and used > baseline + tolerance:
        if time.monotonic() - t0 > timeout:
            return f"GPU memory NOT released after {timeout:.0f} s: {used:.0f} MiB used, baseline {baseline:.0f} MiB"
        time.sleep(poll)
        used = read()
    return f"GPU memory released after {time.monotonic() - t0:.1f} s ({used} MiB used, baseline {baseline:.0f})"


LOG_PATTERNS = {
    "graph captures": re.compile(r"Capture .* end"),
    "adaptive states built": re.compile(r"Built adaptive runtime state"),
    "ATLAS worker": re.compile(r"adaspec ATLAS worker"),
    "plugin load failures": re.compile(r"Failed to load plugin|Failed to execute general plugin"),
    "tracebacks": re.compile(r"Traceback"),
}
SWITCH_LINE = re.compile(r"Switch adaptive runtime state")
GLUE_LINE = re.compile(r"adaspec ATLAS: .* failed|planning failed")
OVERLAP_LINE = re.compile(r"disable_overlap_schedule=(True|False)")


def count_lines(text: str, pattern: re.Pattern[str]) -> int:
    return sum(1 for line in text.splitlines() if pattern.search(line))


def log_counts(text: str) -> dict[str, int]:
    return {name: count_lines(text, pat) for name, pat in LOG_PATTERNS.items()}


def effective_scheduling(log_text: str, requested: str) -> str:
    """The scheduling mode SGLang actually runs, from its logged server_args; the requested one if absent."""
    m = OVERLAP_LINE.findall(log_text)
    if not m:
        return f"{requested} (requested)"
    return "overlap off" if m[-1] == "True" else "overlap on"


def adaspec_lines(metrics: str) -> list[str]:
    return [ln for ln in metrics.splitlines() if ln.startswith("adaspec_")]


def metric_total(metrics: str, name: str) -> float | None:
    """Sum of a Prometheus sample over its labels (prometheus_client's text parser); None when the server
    does not export it."""
    from prometheus_client.parser import text_string_to_metric_families

    values = []
    try:
        for family in text_string_to_metric_families(metrics):
            values += [s.value for s in family.samples if s.name == name]
    except ValueError:  # a malformed exposition: fall back to what the log says
        return None
    return float(sum(values)) if values else None


def counter(metrics: str, metric: str, log_text: str, fallback: re.Pattern[str]) -> tuple[int, str]:
    """A plugin counter from /metrics, else the count of its log lines (older plugin builds)."""
    v = metric_total(metrics, metric)
    if v is not None:
        return int(v), f"metric {metric}"
    return count_lines(log_text, fallback), f"log lines /{fallback.pattern}/"


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- one configuration --------------------------------------------------------------------------------------


@dataclass
class ConfigResult:
    config: str
    command: list[str]
    env: dict[str, str]
    scheduling: str
    outputs: dict[str, Output] = field(default_factory=dict)
    request_errors: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    health_s: float | None = None
    log: dict[str, int] = field(default_factory=dict)
    greedy: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    switches: tuple[int, str] | None = None
    glue_errors: tuple[int, str] | None = None
    rss_mib: float | None = None
    gpu_mem_mib: float | None = None
    stopped: str = ""
    gpu_released: str = ""
    error: str | None = None

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.outputs.values())

    @property
    def verify_ct(self) -> int:
        return sum(o.verify_ct for o in self.outputs.values())

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tau(self) -> float | None:
        """Output tokens per target forward (SGLang's spec_verify_ct); None without speculation."""
        return self.tokens / self.verify_ct if self.verify_ct else None

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (f.name for f in dataclasses.fields(self)) if k != "outputs"}
        d["outputs"] = {k: o.to_json() for k, o in self.outputs.items()}
        d.update(tokens=self.tokens, verify_ct=self.verify_ct, tok_s=self.tok_s, tau=self.tau)
        return d


@dataclass
class Session:
    """What one server run needs besides its configuration."""

    base: str
    prompts: list[Prompt]
    a: argparse.Namespace
    clock: Clock
    gpu_baseline: float | None


def run_config(config: str, command: list[str], env_add: dict[str, str], log_path: Path, s: Session,
               during: Callable[[ConfigResult], None] | None = None) -> ConfigResult:
    """Start one server, run its checks, stop its whole process group and wait for its GPU memory (always);
    any failure is recorded in the result and printed with the tail of the server log."""
    spec = CONFIGS[config]
    res = ConfigResult(config, command, env_add, spec.scheduling())
    say(f"  command: {shlex.join(command)}")
    say(f"  env: {' '.join(f'{k}={v}' for k, v in env_add.items())}")
    if port_busy(s.base):
        res.error = f"port of {s.base} already in use before the start (a leftover server?)"
        say(f"  FAILED: {res.error}")
        return res
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env_add})
    try:
        _exercise(res, proc, log_path, s, during)
    except Exception as exc:
        rc = proc.poll()
        res.error = (f"{type(exc).__name__}: {exc}" + (f" (server exited with {rc})" if rc is not None else ""))[:400]
        say(f"  FAILED: {res.error}\n  last lines of {log_path}:")
        say("\n".join("    | " + ln for ln in tail(log_path).splitlines()))
    finally:
        res.stopped = stop_server(proc)
        res.gpu_released = wait_gpu_released(s.gpu_baseline, s.a.gpu_release_timeout)
        say(f"  stop: {res.stopped}; {res.gpu_released}")
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        res.log = log_counts(text)
        res.scheduling = effective_scheduling(text, spec.scheduling())
    return res


def _exercise(res: ConfigResult, proc: subprocess.Popen, log_path: Path, s: Session,
              during: Callable[[ConfigResult], None] | None) -> None:
    """Health, greedy probe, stream, sampling, extra work, metrics and memory, in that order."""
    a, spec = s.a, CONFIGS[res.config]
    res.health_s = wait_healthy(s.base, proc, a.start_timeout)
    counts = log_counts(log_path.read_text(errors="replace"))
    say(f"  healthy after {res.health_s:.1f} s; log: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    one = generate(s.base, s.prompts[0], a.max_new_tokens, a.request_timeout)
    res.greedy = {"id": one.id, "text": one.text, "completion_tokens": one.tokens,
                  "spec_verify_ct": one.verify_ct or None, "spec_accept_length": one.accept_length}
    say(f"  greedy {one.id}: {json.dumps(one.text[:300])}")
    say(f"    meta: completion_tokens {one.tokens}, spec_verify_ct {one.verify_ct or '-'}, "
        f"spec_accept_length {one.accept_length if one.accept_length is not None else '-'}")
    run = serve_stream(s.base, s.prompts, a.max_new_tokens, a.concurrency, a.request_timeout,
                       prompt_ids=res.config == REFERENCE)
    res.outputs, res.request_errors, res.wall_s = run.outputs, run.errors, run.wall_s
    tau = f"{res.tau:.2f}" if res.tau is not None else "-"
    longest = max((o.prompt_tokens for o in run.outputs.values()), default=0)
    say(f"  stream: {len(run.outputs)}/{len(s.prompts)} requests, {res.tokens} tokens in {run.wall_s:.2f} s = "
        f"{res.tok_s:.1f} tok/s, tau {tau} (completion tokens / spec_verify_ct), longest prompt {longest} tokens, "
        f"concurrency {a.concurrency}")
    for pid, err in run.errors.items():
        say(f"    request {pid} failed: {err}")
    if spec.atlas:
        res.sampling = sampling_check(s.base, s.prompts, a)
    if during is not None:
        during(res)
    metrics_and_memory(res, proc, log_path, s.base)
    if proc.poll() is not None:
        raise RuntimeError(f"server exited with {proc.returncode} during the run")
    if run.errors:
        raise RuntimeError(f"{len(run.errors)}/{len(s.prompts)} stream requests failed; first: "
                           f"{next(iter(run.errors.values()))}")


def sampling_check(base: str, prompts: Sequence[Prompt], a: argparse.Namespace) -> dict[str, Any]:
    """`--sampling-requests` requests at `--temperature`, concurrently: they must finish, non-empty (SGLang's
    target-only sampling verify on ATLAS chains, audit Q5)."""
    picks = [prompts[i % len(prompts)] for i in range(a.sampling_requests)]

    def one(p: Prompt) -> int | str:
        try:
            return len(generate(base, p, a.max_new_tokens, a.request_timeout, temperature=a.temperature).ids)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:200]

    with ThreadPoolExecutor(max(1, a.concurrency)) as pool:
        got = list(pool.map(one, picks))
    ok = sum(1 for g in got if isinstance(g, int) and g > 0)
    say(f"  sampling (temperature {a.temperature}): {ok}/{len(got)} non-empty; lengths/errors {got}")
    return {"temperature": a.temperature, "ok": ok, "requests": len(got), "results": got}


def metrics_and_memory(res: ConfigResult, proc: subprocess.Popen, log_path: Path, base: str) -> None:
    """After the run: adaspec_ series, state switches, glue errors, server RSS, GPU memory."""
    try:
        metrics = get_text(base + "/metrics")
    except Exception as exc:
        metrics = ""
        say(f"  /metrics unavailable: {type(exc).__name__}: {exc}")
    res.metrics = adaspec_lines(metrics)
    say(f"  /metrics adaspec_ lines: {len(res.metrics)}")
    for ln in res.metrics:
        say(f"    {ln}")
    text = log_path.read_text(errors="replace")
    if CONFIGS[res.config].speculative:
        res.switches = counter(metrics, "adaspec_sglang_state_switches_total", text, SWITCH_LINE)
        res.glue_errors = counter(metrics, "adaspec_sglang_glue_errors_total", text, GLUE_LINE)
        say(f"  state switches: {res.switches[0]} ({res.switches[1]}); glue errors: {res.glue_errors[0]} "
            f"({res.glue_errors[1]})")
    res.rss_mib = group_rss_mib(proc.pid)
    res.gpu_mem_mib = gpu_mem_used_mib()
    say(f"  server RSS: {_fmt(res.rss_mib, 'MiB')}; GPU memory used: {_fmt(res.gpu_mem_mib, 'MiB')}")


def _fmt(v: float | None, unit: str) -> str:
    return "n/a" if v is None else f"{v:.0f} {unit}"


def reference_extras(s: Session, atlas: ConfigResult | None, rerun: dict[str, Any],
                     ties: dict[str, TieProbe]) -> Callable[[ConfigResult], None]:
    """Work done while the no-spec server is up: the rerun (noise floor of the reference) and a top-2
    logprob probe at each ATLAS divergence. Both optional, skipped once the budget is spent."""

    def during(ref: ConfigResult) -> None:
        a = s.a
        if a.rerun and s.clock.optional("no-spec rerun"):
            again = serve_stream(s.base, s.prompts, a.max_new_tokens, a.concurrency, a.request_timeout)
            diff = first_differences(ref.outputs, again.outputs)
            rerun.update({k: i for k, i in diff.items() if i >= 0})  # a failed request proves nothing
            say(f"  no-spec rerun: {len(ref.outputs) - len(diff)}/{len(ref.outputs)} identical to the first run"
                + (f"; differ: {', '.join(f'{k}@{v}' for k, v in diff.items())}" if diff else ""))
        if atlas is None or not atlas.outputs or a.tie_margin <= 0:
            return
        for pid, idx in first_differences(ref.outputs, atlas.outputs).items():
            if idx < 0 or not s.clock.optional(f"logprob probe of {pid}"):
                continue
            ties[pid] = t = probe_tie(s.base, ref.outputs[pid], atlas.outputs.get(pid), idx, a.request_timeout)
            say(f"  ATLAS divergence {pid}@{idx}: {t.describe()} (ref token {t.ref_token}, ATLAS token {t.got_token})")

    return during


# -- comparison, verdict, report ----------------------------------------------------------------------------


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First index where two token sequences differ (a length difference counts); None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def first_differences(ref: dict[str, Output], got: dict[str, Output]) -> dict[str, int]:
    """Prompt id -> first differing token index for every reference prompt that differs (-1: no output)."""
    out = {}
    for pid, r in ref.items():
        g = got.get(pid)
        idx = -1 if g is None else first_difference(r.ids, g.ids)
        if idx is not None:
            out[pid] = idx
    return out


def show_context(ids: Sequence[int], idx: int, tok: Any | None, width: int = CONTEXT_TOKENS) -> str:
    """+-width tokens around idx, `before >>> from idx on`; decoded when a tokenizer is available."""
    before, after = list(ids[max(0, idx - width):idx]), list(ids[idx:idx + width])
    if tok is None:
        return f"{before} >>> {after}"
    return f"{json.dumps(tok.decode(before))} >>> {json.dumps(tok.decode(after))}"


@dataclass
class Divergence:
    config: str
    prompt: str
    index: int  # -1: the configuration returned no output for it
    ref_context: str
    got_context: str
    eagle3_index: int | None  # EAGLE-3's first difference on the same prompt; None: identical there
    eagle3_ran: bool
    rerun_index: int | None
    tie: TieProbe | None
    explained_by: list[str]


def divergences(results: Sequence[ConfigResult], tok: Any | None, rerun: dict[str, int],
                ties: dict[str, TieProbe], tie_margin: float) -> list[Divergence]:
    """Every prompt on which a configuration's output differs from no-spec's, with its diagnostics."""
    by = {r.config: r for r in results}
    ref = by.get(REFERENCE)
    if ref is None or not ref.outputs:
        return []
    eagle = by.get(EAGLE3)
    eagle_diff = first_differences(ref.outputs, eagle.outputs) if eagle and eagle.outputs else {}
    eagle_ran = eagle is not None and bool(eagle.outputs)
    out = []
    for r in results:
        if r.config == REFERENCE or not r.outputs:  # a server that never served is in the table
            continue
        for pid, idx in first_differences(ref.outputs, r.outputs).items():
            ro, go = ref.outputs[pid], r.outputs.get(pid)
            why = []
            if r.config != EAGLE3 and pid in eagle_diff:
                why.append(f"EAGLE-3 also differs on this prompt (at {eagle_diff[pid]})")
            if pid in rerun:
                why.append(f"the no-spec rerun differs on this prompt (at {rerun[pid]})")
            tie = ties.get(pid) if r.config == ATLAS else None
            if tie is not None and tie.near(tie_margin):
                why.append(f"near tie: no-spec top-2 margin {tie.margin:.3g} < {tie_margin}")
            out.append(Divergence(r.config, pid, idx, show_context(ro.ids, max(idx, 0), tok),
                                  show_context(go.ids, max(idx, 0), tok) if go else "(no output)",
                                  eagle_diff.get(pid), eagle_ran, rerun.get(pid), tie,
                                  why if idx >= 0 else []))
    return out


@dataclass
class Verdict:
    label: str  # lossless | lossless up to numerics | NOT lossless | ATLAS failed | no reference
    reasons: list[str]
    exit_code: int


def verdict(results: Sequence[ConfigResult], divs: Sequence[Divergence]) -> Verdict:
    """The rule of the module docstring, on ATLAS only (the other configurations are context)."""
    by = {r.config: r for r in results}
    ref, atlas = by.get(REFERENCE), by.get(ATLAS)
    if ref is None or not ref.outputs:
        why = ref.error if ref is not None else "not run"
        return Verdict("no reference", [f"SGLang's own no-spec server did not serve: {why}"], 2)
    if atlas is None or not atlas.outputs:
        why = atlas.error if atlas is not None else "not run"
        return Verdict("ATLAS failed", [f"ATLAS did not serve: {why}"], 1)
    reasons, failed = [], False
    if atlas.error is not None:
        reasons.append(f"ATLAS run incomplete: {atlas.error}")
        failed = True
    samp = atlas.sampling
    if samp and samp["ok"] < samp["requests"]:
        reasons.append(f"sampling check: only {samp['ok']}/{samp['requests']} requests at temperature "
                       f"{samp['temperature']} returned tokens")
        failed = True
    mine = [d for d in divs if d.config == ATLAS and d.index >= 0]  # missing outputs: atlas.error above
    unexplained = [d for d in mine if not d.explained_by]
    if not mine:
        label = "lossless"
        reasons.insert(0, f"ATLAS output identical to no-spec on all {len(ref.outputs)} prompts")
    elif not unexplained:
        label = "lossless up to numerics"
        reasons.insert(0, f"ATLAS differs on {len(mine)}/{len(ref.outputs)} prompts, each explained by numerics: "
                       + "; ".join(f"{d.prompt}@{d.index}: {', '.join(d.explained_by)}" for d in mine))
    else:
        label = "NOT lossless"
        reasons.insert(0, f"ATLAS differs on {len(unexplained)} prompt(s) where neither EAGLE-3 nor the no-spec "
                       "rerun differs and no near tie was shown: "
                       + ", ".join(f"{d.prompt}@{d.index}" for d in unexplained))
    if atlas.glue_errors and atlas.glue_errors[0]:
        reasons.append(f"note: {atlas.glue_errors[0]} ATLAS glue errors (steps fell back to EAGLE-3; outputs are "
                       "still decided by verification)")
    ok = label in ("lossless", "lossless up to numerics") and not failed
    return Verdict(label, reasons, 0 if ok else 1)


def table(results: Sequence[ConfigResult]) -> str:
    """One row per configuration: speed, tau, identical outputs and the scheduling mode it ran in."""
    ref = next((r for r in results if r.config == REFERENCE and r.outputs), None)
    lines = ["| configuration | scheduling | tok/s | speedup vs no-spec | tau (tokens/forward) | "
             "identical/compared vs no-spec | time to /health (s) |",
             "|---|---|---:|---:|---:|---|---:|"]
    for r in results:
        health = f"{r.health_s:.1f}" if r.health_s is not None else "-"
        if not r.outputs:
            lines.append(f"| {r.config} | {r.scheduling} | failed: {r.error} | | | | {health} |")
            continue
        speed = f"{r.tok_s / ref.tok_s:.2f}x" if ref is not None and ref.tok_s > 0 else "-"
        tau = f"{r.tau:.2f}" if r.tau is not None else "1.00" if r.config == REFERENCE else "-"
        if ref is None:
            same = "no reference"
        elif r is ref:
            same = "reference"
        else:
            diff = first_differences(ref.outputs, r.outputs)
            same = f"{len(ref.outputs) - len(diff)}/{len(ref.outputs)}"
        note = f" ({r.error})" if r.error else ""
        lines.append(f"| {r.config} | {r.scheduling} | {r.tok_s:.1f} | {speed} | {tau} | {same}{note} | {health} |")
    return "\n".join(lines)


def divergence_section(divs: Sequence[Divergence]) -> list[str]:
    if not divs:
        return ["No configuration's output differs from no-spec's."]
    lines = []
    for d in divs:
        if d.index < 0:
            lines.append(f"- **{d.config}** `{d.prompt}`: no output")
            continue
        if d.config == EAGLE3:
            eagle = ""
        elif not d.eagle3_ran:
            eagle = "; EAGLE-3: not available"
        else:
            eagle = ("; EAGLE-3 differs too (at token %d)" % d.eagle3_index if d.eagle3_index is not None
                     else "; EAGLE-3 identical on this prompt")
        rerun = "" if d.rerun_index is None else f"; no-spec rerun differs (at token {d.rerun_index})"
        tie = "" if d.tie is None else f"; {d.tie.describe()}"
        lines += [f"- **{d.config}** `{d.prompt}`: first differing token {d.index}{eagle}{rerun}{tie}",
                  f"  - no-spec: `` {d.ref_context} ``", f"  - {d.config}: `` {d.got_context} ``"]
    return lines


def write_report(out: Path, results: Sequence[ConfigResult], divs: Sequence[Divergence], v: Verdict,
                 checks: Sequence[Check], clock: Clock, meta: dict[str, Any]) -> None:
    """The markdown results file and the raw JSON next to it (every output's text and token ids)."""
    by = {r.config: r for r in results}
    lines = ["# GPU results: ATLAS in SGLang 0.5.17", "",
             f"Measured by `scripts/gpu_validate.sh` on {meta.get('device', '?')} ({meta.get('date', '?')}), "
             f"total {clock.elapsed():.0f} s.",
             f"Model {meta.get('model')}, static head {meta.get('head')}; {meta.get('prompts')} prompts "
             f"(drift stream + one ~{meta.get('long_prompt_tokens')}-token prompt), max {meta.get('max_new_tokens')} "
             f"new tokens, greedy, concurrency {meta.get('concurrency')}; every output's token ids compared with "
             "SGLang's own no-spec greedy output.", "",
             f"**Verdict: {v.label}** (exit {v.exit_code})", ""]
    lines += [f"- {r}" for r in v.reasons] + ["", table(results), ""]
    atlas, eagle = by.get(ATLAS), by.get(EAGLE3)
    if atlas and eagle and atlas.tok_s and eagle.tok_s:
        lines += [f"ATLAS vs EAGLE-3 at equal scheduling ({atlas.scheduling} / {eagle.scheduling}): "
                  f"{atlas.tok_s / eagle.tok_s:.2f}x tok/s, tau {atlas.tau or 0:.2f} vs {eagle.tau or 0:.2f}.", ""]
    if atlas is not None:
        sw, ge = atlas.switches, atlas.glue_errors
        lines += [f"ATLAS: state switches {sw[0] if sw else '-'}, glue errors {ge[0] if ge else '-'}, server RSS "
                  f"{_fmt(atlas.rss_mib, 'MiB')}, GPU memory {_fmt(atlas.gpu_mem_mib, 'MiB')}, log "
                  + ", ".join(f"{k} {n}" for k, n in atlas.log.items()) + ".", ""]
    lines += ["## Outputs that differ from no-spec", ""] + divergence_section(divs) + ["", "## Preflight", ""]
    lines += [f"- [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in checks]
    lines += ["", "## Phases", ""] + [f"- {p['name']}: {p['elapsed_s']:.1f} s" for p in clock.phases]
    lines += ["", "## Commands", ""]
    for r in results:
        env = " ".join(f"{k}={shlex.quote(val)}" for k, val in r.env.items())
        lines += [f"{r.config}:", "", "```", f"{env} {shlex.join(r.command)}", "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    raw = {"meta": meta, "phases": clock.phases, "preflight": [asdict(c) for c in checks],
           "results": [r.to_json() for r in results], "divergences": [asdict(d) for d in divs],
           "verdict": asdict(v), "total_s": round(clock.elapsed(), 2)}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))


# -- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="target model dir (local, e.g. adaspec's cache)")
    ap.add_argument("--head", required=True, help="static EAGLE-3 head dir in SGLang's format (the shipped one)")
    ap.add_argument("--out", default="docs/gpu-results.md", help="markdown results; the JSON goes next to it")
    ap.add_argument("--logs", default=None, help="server logs dir (default: <out dir>/gpu-logs)")
    ap.add_argument("--configs", default="",
                    help=f"extra configurations after the default three: {', '.join(OPTIONAL)}")
    ap.add_argument("--prompts", type=int, default=12, help="drift-stream prompts (plus the long one)")
    ap.add_argument("--long-prompt-tokens", type=int, default=1500)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--sampling-requests", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--candidate-steps", default="0,1,3,8", help="ADASPEC_SGLANG_CANDIDATE_STEPS for ATLAS")
    ap.add_argument("--eagle-steps", type=int, default=3, help="EAGLE-3 control: --speculative-num-steps")
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention-backend", default="triton")
    ap.add_argument("--max-running-requests", type=int, default=8, help="also --cuda-graph-max-bs-decode")
    ap.add_argument("--chunked-prefill-size", type=int, default=512)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--preflight-timeout", type=float, default=120.0)
    ap.add_argument("--gpu-release-timeout", type=float, default=60.0)
    ap.add_argument("--budget-s", type=float, default=600.0, help="optional parts are skipped once spent")
    ap.add_argument("--tie-margin", type=float, default=0.02,
                    help="near tie: no-spec top-2 logprob margin below this (nats); 0 = no probe")
    ap.add_argument("--no-rerun", dest="rerun", action="store_false", help="skip the no-spec rerun")
    ap.add_argument("--adaptive-base", default=None, help="head base file (reused if it exists, else built there)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the preflight probes (= the servers')")
    ap.add_argument("--launcher", default=None, help="replaces `python -m sglang.launch_server` (tests)")
    ap.add_argument("--extra", default="", help="extra server flags for every configuration")
    ap.add_argument("--raw", action="store_true", help="send prompts without the chat template")
    ap.add_argument("--allow-unready", action="store_true",
                    help="report machine-readiness failures but go on (CPU tests against the fake server)")
    a = ap.parse_args(argv)
    a.extra_configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in a.extra_configs if c not in OPTIONAL]
    if bad:
        ap.error(f"unknown --configs {', '.join(bad)}; optional configurations: {', '.join(OPTIONAL)}")
    if a.concurrency > a.max_running_requests:
        ap.error("--concurrency above --max-running-requests would queue requests instead of batching them")
    return a


def _device() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown device"


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    clock = Clock(a.budget_s)
    out = Path(a.out)
    logs = Path(a.logs) if a.logs else out.parent / "gpu-logs"
    logs.mkdir(parents=True, exist_ok=True)
    base_path = Path(a.adaptive_base) if a.adaptive_base else logs / "adaptive-base.safetensors"
    meta = {"model": a.model, "head": a.head, "max_new_tokens": a.max_new_tokens, "concurrency": a.concurrency,
            "long_prompt_tokens": a.long_prompt_tokens, "candidate_steps": a.candidate_steps,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": _device(),
            "budget_s": a.budget_s, "tie_margin": a.tie_margin}
    say(f"adaspec GPU validation: model {a.model}, head {a.head}, budget {a.budget_s:.0f} s")
    with clock.phase("preflight"):
        checks, base_ok = preflight(a, base_path)
        tok = load_tokenizer(a.model)
        prompts = build_prompts(a, tok)
        meta["prompts"] = len(prompts)
        gpu_baseline = gpu_mem_used_mib()
        say(f"  prompts: {len(prompts)} ({', '.join(p.id for p in prompts)}); GPU memory before any server: "
            f"{_fmt(gpu_baseline, 'MiB')}")
    if clock.phases[-1]["elapsed_s"] > 30:
        say(f"  note: preflight took {clock.phases[-1]['elapsed_s']:.0f} s (> 30 s)")
    fatal = [c for c in checks if c.fatal]
    if fatal and not a.allow_unready:
        v = Verdict("machine not ready", [f"{c.name}: {c.detail}" for c in fatal], 2)
        write_report(out, [], [], v, checks, clock, meta)
        say(f"\nmachine not ready: {'; '.join(v.reasons)}\nexit 2")
        return 2
    launcher = shlex.split(a.launcher) if a.launcher else [sys.executable, "-m", "sglang.launch_server"]
    atlas_env = {"ADASPEC_SGLANG_CANDIDATE_STEPS": a.candidate_steps, "ADASPEC_SGLANG_SIDECAR": "false",
                 "ADASPEC_SGLANG_ADAPTIVE_BASE": str(base_path)}
    if not base_ok:
        say(f"  note: no adaptive base at {base_path}: the ATLAS server runs with the adaptive drafter off")
    s = Session(f"http://127.0.0.1:{a.port}", prompts, a, clock, gpu_baseline)
    results: list[ConfigResult] = []
    rerun: dict[str, int] = {}
    ties: dict[str, TieProbe] = {}
    with tempfile.TemporaryDirectory(prefix="adaspec-validate-") as tmp:
        for config in [*DEFAULT_RUN, *a.extra_configs]:
            if config in a.extra_configs and not clock.optional(f"configuration {config}"):
                continue
            with clock.phase(config):
                triton_cache = Path(tempfile.mkdtemp(prefix=f"triton-{config}-", dir=tmp))
                during = None
                if config == REFERENCE:
                    during = reference_extras(s, next((r for r in results if r.config == ATLAS), None), rerun, ties)
                results.append(run_config(config, launch_args(config, a, launcher),
                                          server_env(config, triton_cache, atlas_env), logs / f"{config}.log", s,
                                          during))
    with clock.phase("report"):
        divs = divergences(results, tok, rerun, ties, a.tie_margin)
        v = verdict(results, divs)
        if fatal:
            v.reasons.append("preflight: machine-readiness failures ignored (--allow-unready): "
                             + ", ".join(c.name for c in fatal))
        write_report(out, results, divs, v, checks, clock, meta)
        say(table(results))
        say("\n".join(divergence_section(divs)))
    say(f"\nverdict: {v.label} -- " + "; ".join(v.reasons))
    say(f"results: {out} (+ {out.with_suffix('.json').name}), server logs: {logs}/")
    say(f"total {clock.elapsed():.1f} s; exit {v.exit_code}")
    return v.exit_code


if __name__ == "__main__":
    sys.exit(main())
