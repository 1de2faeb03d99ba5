"""Kernel-vs-torch timings: `python -m adaspec.kernels.bench`.

On CUDA: median latency (CUDA events, after warmup) of the Triton draft head, the Triton greedy verifier and
the flashinfer rejection verifier against their torch references, plus whether their outputs agree. Without
CUDA the kernels cannot be timed (the Triton interpreter measures numpy, not kernels), so it says so and
times the torch references on CPU, which is what the engine runs there.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table

from .backend import flashinfer_available, triton_available
from .reference import draft_topk_reference, greedy_verify_reference, rejection_verify_reference

__all__ = ["main", "time_fn"]


def time_fn(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def _speedup(ref: float, ker: float | None) -> str:
    return "-" if ker is None else f"{ref / ker:.2f}x"


def _bench_draft(console: Console, device: torch.device, shapes: Sequence[tuple[int, int]], bs: Sequence[int],
                 ks: Sequence[int], dtype: torch.dtype, reps: int, warmup: int) -> None:
    kernel = None
    if device.type == "cuda" and triton_available():
        from .triton_draft_head import draft_topk_triton as kernel
    table = Table(title=f"draft_topk ({dtype}, {device.type})")
    for col in ("V", "d", "B", "k", "torch ms", "triton ms", "speedup", "ids match"):
        table.add_column(col, justify="right")
    for V, d in shapes:
        weight = torch.randn(V, d, device=device).to(dtype)
        for B in bs:
            hidden = torch.randn(B, d, device=device).to(dtype)
            for k in ks:
                ref_ms = time_fn(lambda: draft_topk_reference(hidden, weight, k), device, reps, warmup)
                ker_ms, match = None, "-"
                if kernel is not None:
                    ker_ms = time_fn(lambda: kernel(hidden, weight, k), device, reps, warmup)
                    match = str(bool((kernel(hidden, weight, k)[0] == draft_topk_reference(hidden, weight, k)[0]).all()))
                table.add_row(str(V), str(d), str(B), str(k), _fmt(ref_ms), _fmt(ker_ms), _speedup(ref_ms, ker_ms), match)
    console.print(table)


def _verify_inputs(B: int, K: int, V: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(B * 100 + K)
    draft = torch.randint(0, V, (B, K), generator=gen).to(device)
    lens = torch.full((B,), K, dtype=torch.long).to(device)
    target = draft.new_empty(B, K + 1)
    target[:, :K] = torch.where(torch.rand(B, K, generator=gen).to(device) < 0.7, draft, (draft + 1) % V)
    target[:, K] = 0
    return draft, lens, target


def _bench_greedy(console: Console, device: torch.device, bs: Sequence[int], Ks: Sequence[int], reps: int, warmup: int) -> None:
    kernel = None
    if device.type == "cuda" and triton_available():
        from .triton_verify import greedy_verify_triton as kernel
    table = Table(title=f"greedy_verify ({device.type})")
    for col in ("B", "K", "torch ms", "triton ms", "speedup", "match"):
        table.add_column(col, justify="right")
    for B in bs:
        for K in Ks:
            draft, lens, target = _verify_inputs(B, K, 49152, device)
            ref_ms = time_fn(lambda: greedy_verify_reference(draft, lens, target), device, reps, warmup)
            ker_ms, match = None, "-"
            if kernel is not None:
                ker_ms = time_fn(lambda: kernel(draft, lens, target), device, reps, warmup)
                ref = greedy_verify_reference(draft, lens, target)
                match = str(all(torch.equal(a, b) for a, b in zip(ref, kernel(draft, lens, target))))
            table.add_row(str(B), str(K), _fmt(ref_ms), _fmt(ker_ms), _speedup(ref_ms, ker_ms), match)
    console.print(table)


def _bench_rejection(console: Console, device: torch.device, bs: Sequence[int], Ks: Sequence[int], V: int,
                     reps: int, warmup: int) -> None:
    kernel = None
    if device.type == "cuda" and flashinfer_available():
        from .flashinfer_verify import flashinfer_chain_sampler, rejection_verify_flashinfer

        if flashinfer_chain_sampler() is not None:
            kernel = functools.partial(rejection_verify_flashinfer, allow_own_rng=True)
    table = Table(title=f"rejection_verify V={V} ({device.type}; flashinfer matches in distribution only)")
    for col in ("B", "K", "q", "torch ms", "flashinfer ms", "speedup"):
        table.add_column(col, justify="right")
    for B in bs:
        for K in Ks:
            draft, lens, _ = _verify_inputs(B, K, V, device)
            p = torch.softmax(torch.randn(B, K + 1, V, device=device), -1)
            u, ru = torch.rand(B, K, device=device), torch.rand(B, device=device)
            for q_name, q in (("point", None), ("full", torch.softmax(torch.randn(B, K, V, device=device), -1))):
                args = (draft, lens, p, q, u, ru)
                ref_ms = time_fn(lambda: rejection_verify_reference(*args), device, reps, warmup)
                ker_ms = None if kernel is None else time_fn(lambda: kernel(*args), device, reps, warmup)
                table.add_row(str(B), str(K), q_name, _fmt(ref_ms), _fmt(ker_ms), _speedup(ref_ms, ker_ms))
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the timing tables; exit code 0 (also without CUDA, where only the references are timed)."""
    parser = argparse.ArgumentParser(prog="python -m adaspec.kernels.bench", description=__doc__)
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case (median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warmup calls per case")
    args = parser.parse_args(argv)
    console = Console()
    torch.manual_seed(0)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        reps, warmup = args.reps or 50, args.warmup or 10
        console.print(f"[bold]{torch.cuda.get_device_name(device)}[/], triton={triton_available()}, "
                      f"flashinfer={flashinfer_available()}")
        _bench_draft(console, device, [(49152, 576), (152064, 4096)], [1, 2, 4, 8, 16, 64], [1, 4, 8],
                     torch.bfloat16, reps, warmup)
        _bench_greedy(console, device, [1, 8, 64], [4, 8], reps, warmup)
        _bench_rejection(console, device, [1, 8, 64], [4, 8], 49152, reps, warmup)
        return 0
    console.print("CUDA is required for kernel timings (Triton/flashinfer); no CUDA device found, "
                  "so only the torch references are timed, on CPU.")
    device = torch.device("cpu")
    reps, warmup = args.reps or 5, args.warmup or 1
    _bench_draft(console, device, [(49152, 576)], [1, 8, 64], [1, 8], torch.float32, reps, warmup)
    _bench_draft(console, device, [(152064, 4096)], [1], [8], torch.bfloat16, max(1, reps // 2), warmup)
    _bench_greedy(console, device, [1, 8, 64], [4, 8], reps, warmup)
    _bench_rejection(console, device, [1, 8], [4, 8], 49152, reps, warmup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
