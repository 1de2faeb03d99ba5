"""GPU validation of `--speculative-algorithm ATLAS` against SGLang's own modes (driven by scripts/gpu_validate.sh).

For each configuration -- no speculation, EAGLE3 with our static head, EAGLE3 + `--speculative-adaptive`, NGRAM,
ATLAS -- it starts `python -m sglang.launch_server` with the same model and common flags, waits for /health,
warms up, serves the drift stream (`adaspec.core.drift.stream`: chat -> code -> code edits -> math -> chat)
greedily and measures output tokens per second, and compares every output with the no-speculation server's
(SGLang's own greedy decoding is the reference: lossless means identical text for every request). One
markdown table plus the exact commands go to the results file; the raw numbers to a JSON next to it.

Everything but starting the server is plain HTTP and arithmetic, so it runs (and is tested) on CPU against a
fake server (`launcher` replaces `python -m sglang.launch_server`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

CONFIGS = ("no-spec", "eagle3", "eagle3-adaptive", "ngram", "atlas")
REFERENCE = "no-spec"


def spec_args(config: str, head: str, steps: int = 3) -> list[str]:
    """The speculative flags of one configuration (the model and common flags are added by `launch_args`)."""
    eagle = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", head,
             "--speculative-eagle-topk", "1"]
    if config == "no-spec":
        return []
    if config == "eagle3":
        return eagle + ["--speculative-num-steps", str(steps), "--speculative-num-draft-tokens", str(steps + 1)]
    if config == "eagle3-adaptive":
        return eagle + ["--speculative-adaptive"]
    if config == "ngram":
        return ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(2 * steps + 2)]
    if config == "atlas":
        return ["--speculative-algorithm", "ATLAS", "--speculative-draft-model-path", head]
    raise ValueError(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")


def launch_args(config: str, model: str, head: str, port: int, dtype: str = "float32",
                extra: Sequence[str] = (), launcher: Sequence[str] = (sys.executable, "-m", "sglang.launch_server"),
                steps: int = 3, attention: str = "triton") -> list[str]:
    """The full server command line. Common to every configuration: model, dtype and attention backend
    (float32 + triton by default: exact comparisons need float32, which FlashInfer/FA3 do not serve), port,
    no radix cache (every configuration computes every prompt the same way), metrics on."""
    return [*launcher, "--model-path", model, "--dtype", dtype, "--attention-backend", attention, "--host",
            "127.0.0.1", "--port", str(port), "--disable-radix-cache", "--enable-metrics",
            *spec_args(config, head, steps), *extra]


# -- HTTP -------------------------------------------------------------------------------------------------------


def _post(url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(base: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """Poll /health until it answers 200; RuntimeError if the server exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server at {base} not healthy after {timeout:.0f}s")


@dataclass
class Output:
    id: str
    text: str
    tokens: int
    verify_ct: int  # target forwards of the decode (SGLang's spec_verify_ct; 0 without speculation)


def generate(base: str, pid: str, text: str, max_new_tokens: int, timeout: float = 600.0) -> Output:
    """One greedy /generate request."""
    r = _post(base + "/generate", {"text": text, "sampling_params": {"temperature": 0.0,
                                                                       "max_new_tokens": max_new_tokens}}, timeout)
    meta = r.get("meta_info", {})
    return Output(pid, r["text"], int(meta.get("completion_tokens", 0)), int(meta.get("spec_verify_ct", 0) or 0))


# -- results ----------------------------------------------------------------------------------------------------


@dataclass
class ConfigResult:
    config: str
    command: list[str]
    outputs: dict[str, str] = field(default_factory=dict)  # id -> text
    tokens: int = 0
    verify_ct: int = 0
    wall_s: float = 0.0
    error: str | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tau(self) -> float | None:
        """Output tokens per target forward (None without speculation)."""
        return self.tokens / self.verify_ct if self.verify_ct else None


def compare(reference: dict[str, str], got: dict[str, str]) -> tuple[int, int, list[str]]:
    """(identical, compared, ids that differ or are missing) against the reference outputs."""
    bad = [pid for pid in reference if got.get(pid) != reference[pid]]
    return len(reference) - len(bad), len(reference), bad


def table(results: Sequence[ConfigResult]) -> str:
    """The markdown table: tok/s, speedup over no-spec, tau, losslessness vs SGLang's own greedy output."""
    ref = next((r for r in results if r.config == REFERENCE and r.error is None), None)
    lines = ["| configuration | tok/s | speedup | tau (tokens/forward) | identical to no-spec greedy |",
             "|---|---:|---:|---:|---|"]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.config} | failed: {r.error} | | | |")
            continue
        speed = f"{r.tok_s / ref.tok_s:.2f}x" if ref is not None and ref.tok_s > 0 else "-"
        tau = f"{r.tau:.2f}" if r.tau is not None else "1.00" if r.config == REFERENCE else "-"
        if ref is None:
            same = "no reference"
        elif r.config == REFERENCE:
            same = "reference"
        else:
            ok, n, bad = compare(ref.outputs, r.outputs)
            same = f"{ok}/{n}" + ("" if not bad else f" (differ: {', '.join(bad[:5])})")
        lines.append(f"| {r.config} | {r.tok_s:.1f} | {speed} | {tau} | {same} |")
    return "\n".join(lines)


def lossless_ok(results: Sequence[ConfigResult]) -> bool:
    ref = next((r for r in results if r.config == REFERENCE and r.error is None), None)
    if ref is None:
        return False
    return all(r.error is None and not compare(ref.outputs, r.outputs)[2] for r in results if r is not ref)


# -- one configuration ----------------------------------------------------------------------------------------


def run_config(config: str, command: list[str], base: str, stream: Sequence[tuple[str, str]],
               max_new_tokens: int, concurrency: int, start_timeout: float, log_path: Path, warmup: int = 2,
               popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> ConfigResult:
    """Start the server, warm up, time the stream keeping every output, stop the server (always)."""
    res = ConfigResult(config, command)
    with open(log_path, "w") as log:
        proc = popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(base, proc, start_timeout)
            for pid, text in stream[:warmup]:  # untimed: CUDA graphs, allocator, caches
                generate(base, pid, text, max_new_tokens)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                outs = list(pool.map(lambda p: generate(base, p[0], p[1], max_new_tokens), stream))
            res.wall_s = time.perf_counter() - t0
            res.tokens = sum(o.tokens for o in outs)
            res.verify_ct = sum(o.verify_ct for o in outs)
            res.outputs = {o.id: o.text for o in outs}
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            _stop(proc)
    return res


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


# -- prompts ----------------------------------------------------------------------------------------------------


def chat_texts(model: str, prompts: Sequence[str], raw: bool = False) -> list[str]:
    """Prompts through the model's chat template (what `adaspec generate` does by default)."""
    if raw:
        return list(prompts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def drift_stream(per_phase: int, data_dir: Path | None = None) -> list[tuple[str, str]]:
    """(id, prompt) of the drift stream, in order (the same stream `adaspec bench drift` serves)."""
    from adaspec.core.drift.stream import build_stream, default_phases

    return [(f"{r.phase}/{r.prompt_id}", r.prompt) for r in build_stream(default_phases(per_phase, data_dir))]


def write_report(out: Path, results: Sequence[ConfigResult], meta: dict[str, Any]) -> None:
    """docs/gpu-results.md (table + commands) and the raw numbers next to it (.json)."""
    lines = ["# GPU results: ATLAS in SGLang 0.5.17", "",
             f"Measured by `scripts/gpu_validate.sh` on {meta.get('device', '?')} ({meta.get('date', '?')}).",
             f"Model {meta.get('model')}, static head {meta.get('head')}; {meta.get('stream_requests')} drift-stream "
             f"requests (chat -> code -> code edits -> math -> chat, {meta.get('per_phase')} per phase), "
             f"max {meta.get('max_new_tokens')} new tokens, greedy, concurrency {meta.get('concurrency')}; "
             "every output compared with SGLang's own no-speculation greedy output.", "", table(results), "",
             "Lossless: " + ("every configuration produced exactly the no-spec outputs." if lossless_ok(results)
                             else "NOT all outputs identical (see table)."), "", "## Commands", ""]
    for r in results:
        lines += [f"{r.config}:", "", "```", shlex.join(r.command), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    raw = [{**asdict(r), "tok_s": r.tok_s, "tau": r.tau} for r in results]
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": raw}, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="target model dir (adaspec models fetch)")
    ap.add_argument("--head", required=True, help="static EAGLE-3 head dir in SGLang's format (train-static)")
    ap.add_argument("--out", default="docs/gpu-results.md")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--per-phase", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention-backend", default="triton")
    ap.add_argument("--steps", type=int, default=3, help="EAGLE3/NGRAM fixed lookahead")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--launcher", default=None, help="replaces `python -m sglang.launch_server` (tests)")
    ap.add_argument("--extra", default="", help="extra server flags for every configuration")
    ap.add_argument("--raw", action="store_true", help="send prompts without the chat template")
    ap.add_argument("--logs", default=None, help="server logs dir (default: next to --out)")
    a = ap.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in configs:
        spec_args(c, a.head)  # unknown names fail before anything starts
    if REFERENCE not in configs:
        configs.insert(0, REFERENCE)
    stream_rows = drift_stream(a.per_phase)
    texts = chat_texts(a.model, [p for _, p in stream_rows], a.raw)
    stream = [(pid, t) for (pid, _), t in zip(stream_rows, texts)]
    out = Path(a.out)
    logs = Path(a.logs) if a.logs else out.parent / "gpu-logs"
    logs.mkdir(parents=True, exist_ok=True)
    launcher = shlex.split(a.launcher) if a.launcher else (sys.executable, "-m", "sglang.launch_server")
    base = f"http://127.0.0.1:{a.port}"
    results = []
    for c in configs:
        cmd = launch_args(c, a.model, a.head, a.port, a.dtype, shlex.split(a.extra), launcher, a.steps,
                          a.attention_backend)
        print(f"== {c}: {shlex.join(cmd)}", flush=True)
        r = run_config(c, cmd, base, stream, a.max_new_tokens, a.concurrency, a.start_timeout, logs / f"{c}.log")
        print(f"   {'error: ' + r.error if r.error else f'{r.tok_s:.1f} tok/s, tau {r.tau}'}", flush=True)
        results.append(r)
    meta = {"model": a.model, "head": a.head, "per_phase": a.per_phase, "stream_requests": len(stream),
            "max_new_tokens": a.max_new_tokens, "concurrency": a.concurrency,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": _device()}
    write_report(out, results, meta)
    print(table(results))
    return 0 if lossless_ok(results) else 1


def _device() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown device"


if __name__ == "__main__":
    sys.exit(main())
