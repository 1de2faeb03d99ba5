"""Load check of a running `adaspec serve`: N concurrent streaming clients for S seconds, on loopback.

Each client sends chat completions back to back (prompts cycled from a shared dataset, streamed), and the run
reports what a user of an OpenAI-compatible server reads first: failed requests, end-to-end latency and time
to first token (p50 / p99), output tokens/s, and the server's resident memory at the start and the end
(`--pid`: flat memory under constant load is the check that nothing leaks per request).

Run: adaspec bench serve --url http://127.0.0.1:8000 [--concurrency 4] [--seconds 60] [--pid PID] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import httpx

from adaspec.core.datasets import load_prompts, shared_data_dir


@dataclass
class LoadReport:
    concurrency: int
    seconds: float
    requests: int = 0
    failed: int = 0
    tokens: int = 0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    tokens_per_s: float = 0.0
    rss_start_mb: float | None = None
    rss_end_mb: float | None = None
    errors: list[str] = field(default_factory=list)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q * 100) - 1))]


async def _client(http: httpx.AsyncClient, url: str, prompts: Sequence[str], start: int, deadline: float,
                  max_tokens: int, lat: list[float], ttft: list[float], report: LoadReport) -> None:
    i = start
    while time.monotonic() < deadline:
        body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        i += 1
        t0 = time.monotonic()
        first, tokens, done = None, 0, False
        try:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        first = time.monotonic() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            if not done:
                raise RuntimeError("stream ended without [DONE]")
        except Exception as exc:  # counted and reported; the load goes on
            report.failed += 1
            if len(report.errors) < 5:
                report.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        report.requests += 1
        report.tokens += tokens
        lat.append(time.monotonic() - t0)
        if first is not None:
            ttft.append(first)


async def run_load(url: str, concurrency: int, seconds: float, max_tokens: int = 48, pid: int | None = None,
                   dataset: Path | None = None) -> LoadReport:
    prompts = [r.prompt for r in load_prompts(dataset or shared_data_dir() / "mt_bench.jsonl", 80)]
    report = LoadReport(concurrency, seconds)
    report.rss_start_mb = rss_mb(pid) if pid else None
    lat: list[float] = []
    ttft: list[float] = []
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as http:
        await asyncio.gather(*[_client(http, url, prompts, 7 * c, t0 + seconds, max_tokens, lat, ttft, report)
                               for c in range(concurrency)])
    wall = time.monotonic() - t0
    report.rss_end_mb = rss_mb(pid) if pid else None
    report.latency_p50_s, report.latency_p99_s = _pct(sorted(lat), 0.5), _pct(sorted(lat), 0.99)
    report.ttft_p50_s, report.ttft_p99_s = _pct(sorted(ttft), 0.5), _pct(sorted(ttft), 0.99)
    report.tokens_per_s = report.tokens / wall if wall else 0.0
    return report


def print_report(r: LoadReport) -> None:
    print(f"{r.concurrency} concurrent streams for {r.seconds:.0f} s: {r.requests} requests, {r.failed} failed, "
          f"{r.tokens} tokens ({r.tokens_per_s:.1f} tok/s)")
    print(f"latency p50 {r.latency_p50_s:.2f} s, p99 {r.latency_p99_s:.2f} s; "
          f"time to first token p50 {r.ttft_p50_s:.2f} s, p99 {r.ttft_p99_s:.2f} s")
    if r.rss_start_mb is not None and r.rss_end_mb is not None:
        print(f"server RSS {r.rss_start_mb:.0f} MB -> {r.rss_end_mb:.0f} MB")
    for e in r.errors:
        print("error:", e)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--pid", type=int, default=None, help="server process id (memory at start and end)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    report = asyncio.run(run_load(args.url.rstrip("/"), args.concurrency, args.seconds, args.max_tokens, args.pid))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1) + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
