"""Micro-benchmark of the suffix drafter: propose cost per request per step, update cost, cache memory, tau.

Why synthetic data: the cost bar (propose <= 100 us per request per step at depth 32) must hold on a
realistic shape of work, which a generator reproduces without a model: a tenant cache of a few hundred
responses of a few hundred tokens, and requests whose contexts grow from ~500 to ~1500 tokens while greedy
speculative decoding is replayed on them, several at once (so each step indexes the tokens the previous step
accepted, and finishing requests change the cache under the live ones, as in serving). Text is built from a
Zipf-distributed phrase bank, random tokens and copies of earlier text (prompt or past responses), so both
draft sources find matches of realistic lengths. The synthetic tau is a sanity figure, not a prediction;
pass `--traces` (JSON lines with "prompt" and "output" token ids, optional "tenant") for a real replay tau.

Run: python -m adaspec.core.bench.suffix [--depth 32] [--k 16] [--traces FILE.jsonl]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from adaspec.core.drafters.base import Draft, DraftRequest, Observation
from adaspec.core.drafters.suffix import SuffixDrafter
from adaspec.core.drafters.suffix.tree import SuffixIndex
from adaspec.core.bench.suffix_replay import ReplayRequest, simulate_greedy, simulate_greedy_batch

TENANT = "bench"


# ---------------------------------------------------------------------- synthetic workload


@dataclass
class Workload:
    """Past responses to pre-fill the tenant cache with, and (prompt, output) requests to replay."""

    cached: list[list[int]]
    requests: list[tuple[list[int], list[int]]]


class _TextGen:
    """Token text with realistic repetition: Zipf phrases, noise tokens, and copies of earlier text."""

    def __init__(self, rng: random.Random, vocab: int, phrases: int = 2000) -> None:
        self.rng = rng
        self.vocab = vocab
        self.phrases = [[rng.randrange(vocab) for _ in range(rng.randint(2, 8))] for _ in range(phrases)]
        self.cum = list(accumulate(1.0 / (r + 1) ** 1.1 for r in range(phrases)))

    def text(self, n: int, sources: Sequence[Sequence[int]] = (), copy_prob: float = 0.0) -> list[int]:
        rng = self.rng
        out: list[int] = []
        while len(out) < n:
            u = rng.random()
            if sources and u < copy_prob:
                src = rng.choice(sources)
                if len(src) > 8:
                    span = rng.randint(8, min(80, len(src)))
                    at = rng.randrange(len(src) - span + 1)
                    out.extend(src[at : at + span])
                    continue
            if u < 0.9:
                out.extend(rng.choices(self.phrases, cum_weights=self.cum)[0])
            else:
                out.append(rng.randrange(self.vocab))
        return out[:n]


def synthetic_workload(
    seed: int = 0,
    cached: int = 300,
    response_len: tuple[int, int] = (200, 400),
    requests: int = 24,
    prompt_len: tuple[int, int] = (400, 1200),
    output_len: tuple[int, int] = (150, 300),
    vocab: int = 32000,
) -> Workload:
    """A deterministic workload; see the module docstring for its shape."""
    rng = random.Random(seed)
    gen = _TextGen(rng, vocab)
    responses: list[list[int]] = []
    for _ in range(cached):
        responses.append(gen.text(rng.randint(*response_len), responses[-50:], copy_prob=0.15))
    reqs = []
    for _ in range(requests):
        prompt = gen.text(rng.randint(*prompt_len))
        recent = responses[-50:]
        output = gen.text(rng.randint(*output_len), [prompt, prompt, *rng.sample(recent, 4)], copy_prob=0.3)
        reqs.append((prompt, output))
    return Workload(responses, reqs)


# ---------------------------------------------------------------------- measurements


@dataclass
class _TimedDrafter:
    """Wraps a drafter and times it per request: each propose and observe is split into one call per request
    (the suffix drafter treats requests independently, so this changes nothing but the granularity)."""

    inner: SuffixDrafter
    propose_ns: list[int] = field(default_factory=list)
    start_ns: list[tuple[int, int]] = field(default_factory=list)  # (ns, prompt tokens)
    #: decode-step observations: (ns, tokens the step kept); the prefill's observation is left out
    observe_ns: list[tuple[int, int]] = field(default_factory=list)
    _prefilled: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self.inner.hidden_layers

    def start(self, request: DraftRequest) -> None:
        t0 = time.perf_counter_ns()
        self.inner.start(request)
        self.start_ns.append((time.perf_counter_ns() - t0, len(request.tokens)))

    def observe(self, observations: Sequence[Observation]) -> None:
        for obs in observations:
            t0 = time.perf_counter_ns()
            self.inner.observe([obs])
            elapsed = time.perf_counter_ns() - t0
            if obs.request_id in self._prefilled:
                self.observe_ns.append((elapsed, len(obs.tokens)))
            else:
                self._prefilled.add(obs.request_id)

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        drafts = []
        for request, k in zip(requests, ks):
            t0 = time.perf_counter_ns()
            drafts.extend(self.inner.propose([request], [k]))
            self.propose_ns.append(time.perf_counter_ns() - t0)
        return drafts

    def finish(self, request: DraftRequest) -> None:
        self._prefilled.discard(request.request_id)
        self.inner.finish(request)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class BenchResult:
    depth: int
    k: int
    concurrency: int
    propose_p50_us: float
    propose_p95_us: float
    propose_calls: int
    observe_p50_us: float
    observe_p95_us: float
    step_p50_us: float
    step_p95_us: float
    update_us_per_token: float
    prompt_update_us_per_token: float
    cache_insert_us_per_token: float
    cache_evict_us_per_token: float
    cache_tokens: int
    cache_responses: int
    cache_nodes: int
    cache_leaves: int
    cache_bytes: int
    synthetic_tau: float


def _fill(drafter: SuffixDrafter, responses: Sequence[Sequence[int]]) -> float:
    t0 = time.perf_counter_ns()
    for response in responses:
        drafter.caches.add(TENANT, response)
    return (time.perf_counter_ns() - t0) / 1000


def run_benchmark(workload: Workload, depth: int = 32, k: int = 16, concurrency: int = 8) -> BenchResult:
    """Measure everything the report needs on one workload."""
    n_cached = len(workload.cached)
    cached_tokens = sum(len(r) for r in workload.cached)

    def make() -> SuffixDrafter:
        return SuffixDrafter(max_depth=depth, max_spec_tokens=k, cache_max_responses=n_cached)

    # Memory of the filled cache (tracemalloc slows allocation, so this fill is not timed).
    drafter = make()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _fill(drafter, workload.cached)
    cache_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    cache = drafter.cache_for(TENANT)
    assert cache is not None
    nodes, leaves = cache.index.node_count, cache.index.leaf_count
    tokens, responses = cache.tokens, cache.responses

    # Eviction cost: remove every cached response from that cache.
    index: SuffixIndex = cache.index
    t0 = time.perf_counter_ns()
    for doc in list(index.docs):
        index.remove_document(doc)
    evict_us = (time.perf_counter_ns() - t0) / 1000

    # Insertion cost, then a steady-state replay: requests decoded concurrently in lockstep, each finish
    # caching its response and evicting the oldest (so live requests re-resolve their cache matches).
    drafter = make()
    insert_us = _fill(drafter, workload.cached)
    timed = _TimedDrafter(drafter)
    batch = [ReplayRequest(p, o, f"r{i}", TENANT) for i, (p, o) in enumerate(workload.requests)]
    results = simulate_greedy_batch(timed, batch, k, concurrency)
    out_tokens = sum(r.tokens for r in results)
    forwards = sum(r.steps for r in results)
    per_call_us = [ns / 1000 for ns in timed.propose_ns]
    observe_us = [ns / 1000 for ns, _ in timed.observe_ns]
    step_us = [p + o for p, o in zip(per_call_us, observe_us)]
    observed_tokens = sum(n for _, n in timed.observe_ns)
    start_ns = sum(ns for ns, _ in timed.start_ns)
    start_tokens = sum(n for _, n in timed.start_ns)
    return BenchResult(
        depth=depth,
        k=k,
        concurrency=concurrency,
        propose_p50_us=statistics.median(per_call_us),
        propose_p95_us=_percentile(per_call_us, 0.95),
        propose_calls=len(per_call_us),
        observe_p50_us=statistics.median(observe_us),
        observe_p95_us=_percentile(observe_us, 0.95),
        step_p50_us=statistics.median(step_us),
        step_p95_us=_percentile(step_us, 0.95),
        update_us_per_token=sum(observe_us) / observed_tokens,
        prompt_update_us_per_token=start_ns / 1000 / start_tokens,
        cache_insert_us_per_token=insert_us / cached_tokens,
        cache_evict_us_per_token=evict_us / cached_tokens,
        cache_tokens=tokens,
        cache_responses=responses,
        cache_nodes=nodes,
        cache_leaves=leaves,
        cache_bytes=cache_bytes,
        synthetic_tau=out_tokens / forwards,
    )


@dataclass
class TraceReplay:
    requests: int
    tokens: int
    forwards: int
    tau: float
    mean_request_tau: float


def replay_traces(path: Path, depth: int = 32, k: int = 16) -> TraceReplay:
    """Replay recorded greedy outputs (JSON lines: prompt, output, optional tenant) in file order."""
    drafter = SuffixDrafter(max_depth=depth, max_spec_tokens=k)
    taus: list[float] = []
    tokens = forwards = 0
    with path.open() as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            if not rec.get("output"):
                continue
            tenant = str(rec.get("tenant", "default"))
            result = simulate_greedy(drafter, rec["prompt"], rec["output"], k, f"t{i}", tenant)
            taus.append(result.tau)
            tokens += result.tokens
            forwards += result.steps
    if not taus:
        raise ValueError(f"{path} holds no replayable records")
    return TraceReplay(len(taus), tokens, forwards, tokens / forwards, statistics.fmean(taus))


# ---------------------------------------------------------------------- report


def _table(r: BenchResult, trace: TraceReplay | None) -> Table:
    table = Table(title=f"suffix drafter, depth {r.depth}, k {r.k}, {r.concurrency} concurrent requests")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("propose us / request / step, p50", f"{r.propose_p50_us:.1f}")
    table.add_row("propose us / request / step, p95", f"{r.propose_p95_us:.1f}")
    table.add_row("propose calls timed", f"{r.propose_calls}")
    table.add_row("observe (update) us / request / step, p50", f"{r.observe_p50_us:.1f}")
    table.add_row("observe (update) us / request / step, p95", f"{r.observe_p95_us:.1f}")
    table.add_row("propose + observe us / request / step, p50", f"{r.step_p50_us:.1f}")
    table.add_row("propose + observe us / request / step, p95", f"{r.step_p95_us:.1f}")
    table.add_row("request update us / token appended", f"{r.update_us_per_token:.2f}")
    table.add_row("request start (prompt indexing) us / token", f"{r.prompt_update_us_per_token:.2f}")
    table.add_row("cache insert us / token", f"{r.cache_insert_us_per_token:.2f}")
    table.add_row("cache evict us / token", f"{r.cache_evict_us_per_token:.2f}")
    table.add_row("cache responses / tokens", f"{r.cache_responses} / {r.cache_tokens}")
    table.add_row("cache nodes / leaves", f"{r.cache_nodes} / {r.cache_leaves}")
    table.add_row("cache nodes / token", f"{r.cache_nodes / r.cache_tokens:.2f}")
    table.add_row("cache memory MiB (tracemalloc)", f"{r.cache_bytes / 2**20:.1f}")
    table.add_row("cache bytes / token", f"{r.cache_bytes / r.cache_tokens:.0f}")
    table.add_row("synthetic replay tau", f"{r.synthetic_tau:.2f}")
    if trace is not None:
        table.add_row("trace replay: requests / tokens", f"{trace.requests} / {trace.tokens}")
        table.add_row("trace replay tau (tokens / forwards)", f"{trace.tau:.3f}")
        table.add_row("trace replay tau (mean per request)", f"{trace.mean_request_tau:.3f}")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=32, help="max_depth (longest context suffix matched)")
    parser.add_argument("--k", type=int, default=16, help="draft tokens asked per step")
    parser.add_argument("--cached", type=int, default=300, help="responses pre-filled in the tenant cache")
    parser.add_argument("--requests", type=int, default=24, help="requests replayed for the propose timing")
    parser.add_argument("--concurrency", type=int, default=8, help="requests decoded at once in the replay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--traces", type=Path, help="JSON lines {prompt, output[, tenant]} to replay for tau")
    args = parser.parse_args(argv)
    workload = synthetic_workload(args.seed, cached=args.cached, requests=args.requests)
    result = run_benchmark(workload, depth=args.depth, k=args.k, concurrency=args.concurrency)
    trace = replay_traces(args.traces, args.depth, args.k) if args.traces else None
    Console().print(_table(result, trace))


if __name__ == "__main__":
    main()
