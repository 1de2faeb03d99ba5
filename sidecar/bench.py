"""Sidecar benchmark: swap pause, logging overhead, trainer throughput, log -> applied weights on loopback.

    python -m adaspec.sidecar.bench [--swaps 200] [--prompts 8] [--tokens 32] [--skip-engine] [--json PATH]

* swap pause: `WeightStager.apply_if_staged` for the adaptive head at the pinned model's sizes (what the
  engine pauses between steps); validation/staging runs off the hot path and is reported apart.
* logging overhead: the real model serves code_edit prompts with `OnlineAdaptive` attached (every step
  logged with features, PUSHed to a draining PULL); the time inside the step listeners per engine step,
  as a share of the step, plus tokens/s with and without logging (interleaved runs; noisy on shared CPUs).
* trainer: AdamW updates/s and tokens/s of the real-size head; gate evaluation time.
* loopback: log batch PUSH -> PULL, publish -> validated and staged on the server (PUB/SUB over IPC), and
  the apply pause; one learning cycle adds `gate_every` updates and a gate evaluation to that path.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
out = Console(width=None if sys.stdout.isatty() else 120)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _head(hidden: int, vocab: int, inner: int):
    from adaspec.core.heads.adaptive import AdaptiveConfig, AdaptiveHead

    g = torch.Generator().manual_seed(0)
    frozen = torch.randn(vocab, hidden, generator=g) * 0.02
    return AdaptiveHead(AdaptiveConfig(hidden_size=hidden, vocab_size=vocab, inner_size=inner), frozen, frozen)


def bench_swap(hidden: int, vocab: int, inner: int, n: int) -> dict[str, float]:
    """Offer (validate + stage, off the hot path) and apply (the serving pause), n times each."""
    from prometheus_client import CollectorRegistry

    from adaspec.core.online.weights import WeightStager
    from adaspec.core.online.wire import WeightUpdate

    head = _head(hidden, vocab, inner)
    stager = WeightStager(head, "adaptive", registry=CollectorRegistry())
    base = {k: v.detach().clone() for k, v in head.state_dict().items()}
    offer, pause = [], []
    for v in range(1, n + 1):
        update = WeightUpdate.build("adaptive", v, {k: t + 0.001 * v for k, t in base.items()})
        t0 = time.perf_counter()
        assert stager.offer(update)
        offer.append(time.perf_counter() - t0)
        with torch.inference_mode():
            pause.append(stager.apply_if_staged())
    params = sum(t.numel() for t in base.values())
    return {"params": params, "pause_p50_ms": 1e3 * _pct(pause, 0.5), "pause_p99_ms": 1e3 * _pct(pause, 0.99),
            "pause_max_ms": 1e3 * max(pause), "offer_p50_ms": 1e3 * _pct(offer, 0.5),
            "offer_p99_ms": 1e3 * _pct(offer, 0.99)}


def bench_trainer(hidden: int, vocab: int, inner: int, batch: int, unroll: int, n: int, gate_samples: int,
                  gate_k: int) -> dict[str, float]:
    from adaspec.core.heads.adaptive import AdaptiveFeatures
    from adaspec.sidecar.gate import estimate_tau
    from adaspec.sidecar.trainer import Trainer

    trainer = Trainer(_head(hidden, vocab, inner), unroll)
    g = torch.Generator().manual_seed(1)

    def batch_of(m: int):
        return (AdaptiveFeatures(torch.randn(m, hidden, generator=g), torch.randint(0, vocab, (m,), generator=g)),
                torch.randint(0, vocab, (m, max(unroll, gate_k)), generator=g))

    trainer.step(*batch_of(batch))  # warm-up (optimizer state allocation)
    times, tokens = [], 0
    for _ in range(n):
        feats, tgt = batch_of(batch)
        rep = trainer.step(feats, tgt)
        times.append(rep["seconds"])
        tokens += int(rep["tokens"])
    feats, tgt = batch_of(gate_samples)
    t0 = time.perf_counter()
    estimate_tau(trainer.head, feats, tgt, gate_k)
    gate_s = time.perf_counter() - t0
    return {"batch": batch, "unroll": unroll, "update_ms": 1e3 * statistics.mean(times),
            "tokens_per_s": tokens / sum(times), "gate_samples": gate_samples, "gate_k": gate_k,
            "gate_eval_ms_per_head": 1e3 * gate_s}


def bench_loopback(hidden: int, vocab: int, inner: int, n: int) -> dict[str, float]:
    """PUSH->PULL of a typical log batch; publish -> staged on a subscribed server; apply pause."""
    from prometheus_client import CollectorRegistry

    from adaspec.core.online.transport import Transport
    from adaspec.core.online.settings import TransportSettings
    from adaspec.core.online.weights import WeightStager
    from adaspec.core.online.wire import LogBatch, StepEntry, WeightUpdate, encode, tensor_to_blob

    root = Path(tempfile.mkdtemp(prefix="asb-", dir="/tmp"))
    ts = TransportSettings(run_dir=root / "run")
    with Transport(ts) as t:
        puller, pusher = t.log_puller(), t.log_pusher()
        entries = [StepEntry(step=i, request_id=f"r{i}", tenant="t", drafter="adaptive", k=4, drafted=4, accepted=2,
                             emitted=3, draft_tokens=[1, 2, 3, 4], emitted_tokens=[1, 2, 9], confidence=[0.5] * 4,
                             weight_version=1, features=tensor_to_blob(torch.randn(3, hidden))) for i in range(8)]
        data = encode(LogBatch(server_id="s", seq=0, entries=entries))
        log_lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            pusher.send(data)
            assert puller.recv(2000) is not None
            log_lat.append(time.perf_counter() - t0)
        pusher.close()
        puller.close()

        head = _head(hidden, vocab, inner)
        stager = WeightStager(head, "adaptive", registry=CollectorRegistry())
        base = {k: v.detach().clone() for k, v in head.state_dict().items()}
        pub = t.weight_publisher()
        client = t.weight_client(["adaptive"])
        pub_lat, pauses = [], []
        version = 0
        warm = WeightUpdate.build("adaspec-warmup", 1, {"x": torch.zeros(1)})  # other topic: joins the SUB
        deadline = time.monotonic() + 10
        client2 = t.weight_client(["adaspec-warmup"])
        while time.monotonic() < deadline:
            pub.publish(warm)
            warm = WeightUpdate.build("adaspec-warmup", warm.version + 1, {"x": torch.zeros(1)})
            if client2.recv(50) is not None:
                break
        client2.close()
        for _ in range(min(n, 50)):
            version += 1
            update = WeightUpdate.build("adaptive", version, {k: v + 0.001 * version for k, v in base.items()})
            t0 = time.perf_counter()
            pub.publish(update)  # includes encoding on the sidecar
            got = client.recv(5000)
            if got is None:
                continue
            stager.offer(got)
            pub_lat.append(time.perf_counter() - t0)
            with torch.inference_mode():
                pauses.append(stager.apply_if_staged())
        client.close()
        pub.close()
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return {"log_batch_bytes": len(data), "log_p50_ms": 1e3 * _pct(log_lat, 0.5), "log_p99_ms": 1e3 * _pct(log_lat, 0.99),
            "publish_to_staged_p50_ms": 1e3 * _pct(pub_lat, 0.5), "publish_to_staged_p99_ms": 1e3 * _pct(pub_lat, 0.99),
            "apply_p50_ms": 1e3 * _pct(pauses, 0.5)}


class _Timed:
    """Wraps a step listener and accumulates the time spent in it."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, records) -> None:
        t0 = time.perf_counter()
        self.fn(records)
        self.seconds += time.perf_counter() - t0
        self.calls += 1


def bench_logging(n_prompts: int, tokens: int, batch: int, reps: int) -> dict[str, float]:
    """Real model, plain greedy (the shortest steps: the worst case for a per-step overhead)."""
    from prometheus_client import CollectorRegistry

    from adaspec.core.config import load_settings
    from adaspec.core.datasets import load_prompts, shared_data_dir
    from adaspec.core.drafters.adaptive import AdaptiveDrafter
    from adaspec.core.engine.engine import SpecEngine
    from adaspec.core.step import FixedPolicy
    from adaspec.core.engine.sampling import SamplingParams
    from adaspec.core.heads.adaptive import AdaptiveHead
    from adaspec.core.online.attach import OnlineAdaptive
    from adaspec.core.target import load_target
    from adaspec.core.online.transport import Transport
    from adaspec.core.online.settings import TransportSettings

    logging.getLogger("adaspec.core.online.weights").setLevel(logging.ERROR)  # no sidecar here: sync failures are expected
    target = load_target(load_settings(device="cpu"))
    prompts = [target.encode(r.prompt) for r in load_prompts(shared_data_dir() / "code_edit.jsonl", limit=n_prompts)]
    drafter = AdaptiveDrafter(AdaptiveHead.for_target(target, inner_size=1024))
    engine = SpecEngine(target, [drafter], batch_size=batch)
    params = SamplingParams(max_new_tokens=tokens)
    root = Path(tempfile.mkdtemp(prefix="asb-", dir="/tmp"))
    ts = TransportSettings(run_dir=root / "run", log_flush_s=0.0)
    sink = Transport(ts)
    puller = sink.log_puller()
    stop = threading.Event()
    received = [0]

    def drain() -> None:
        while not stop.is_set():
            if puller.recv(50) is not None:
                received[0] += 1

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    plain_tps, logged_tps, listener_s, steps, step_s = [], [], 0.0, 0, 0.0
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4), FixedPolicy("none", 0))  # warm-up
    for _ in range(reps):
        t0 = time.perf_counter()
        res = engine.generate(prompts, params, FixedPolicy("none", 0))
        plain_tps.append(sum(len(r.output_tokens) for r in res) / (time.perf_counter() - t0))
        online = OnlineAdaptive(engine, drafter, ts, registry=CollectorRegistry(), resync_s=3600)
        online.start()
        timed = [_Timed(fn) for fn in engine.step_listeners]
        engine.step_listeners[:] = timed
        s0 = engine.step_count
        t0 = time.perf_counter()
        res = engine.generate(prompts, params, FixedPolicy("none", 0))
        wall = time.perf_counter() - t0
        logged_tps.append(sum(len(r.output_tokens) for r in res) / wall)
        steps += engine.step_count - s0
        step_s += wall
        listener_s += sum(t.seconds for t in timed)
        engine.step_listeners[:] = [t.fn for t in timed]
        online.close()
    stop.set()
    th.join(5)
    puller.close()
    sink.close()
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    per_step = listener_s / max(1, steps)
    return {"steps": steps, "mean_step_ms": 1e3 * step_s / max(1, steps), "log_us_per_step": 1e6 * per_step,
            "log_share_of_step_pct": 100.0 * listener_s / step_s, "batches_received": received[0],
            "tokens_per_s_plain": statistics.median(plain_tps), "tokens_per_s_logged": statistics.median(logged_tps)}


@app.command()
def main(
    swaps: int = typer.Option(200, min=2, help="Swaps timed for the pause percentiles."),
    hidden: int = typer.Option(576, help="Target hidden size (SmolLM2-135M: 576)."),
    vocab: int = typer.Option(49152, help="Target vocabulary (SmolLM2-135M: 49152)."),
    inner: int = typer.Option(1024, help="Adaptive head MLP width."),
    train_batch: int = typer.Option(64, help="Trainer batch size (the sidecar's default)."),
    unroll: int = typer.Option(3, help="Trainer unroll (the sidecar's default)."),
    updates: int = typer.Option(10, min=1, help="Trainer updates timed."),
    prompts: int = typer.Option(8, min=1, help="code_edit prompts served for the logging overhead."),
    tokens: int = typer.Option(32, min=1, help="Tokens generated per prompt."),
    reps: int = typer.Option(2, min=1, help="Interleaved plain/logged runs."),
    skip_engine: bool = typer.Option(False, help="Skip the real-model logging benchmark."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures here."),
) -> None:
    """Print the sidecar path's figures (CPU)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, Any] = {"threads": torch.get_num_threads()}
    results["swap"] = bench_swap(hidden, vocab, inner, swaps)
    from adaspec.sidecar.settings import SidecarSettings

    defaults = SidecarSettings()
    results["trainer"] = bench_trainer(hidden, vocab, inner, train_batch, unroll, updates, defaults.gate_max_samples,
                                       defaults.gate_k)
    results["loopback"] = bench_loopback(hidden, vocab, inner, 200)
    if not skip_engine:
        results["logging"] = bench_logging(prompts, tokens, prompts, reps)
    sw, tr, lb = results["swap"], results["trainer"], results["loopback"]
    table = Table("figure", "value", title=f"sidecar path on CPU ({results['threads']} thread(s))")
    table.add_row("swap pause p50 / p99 / max (goal <= 20 ms)",
                  f"{sw['pause_p50_ms']:.2f} / {sw['pause_p99_ms']:.2f} / {sw['pause_max_ms']:.2f} ms "
                  f"({sw['params'] / 1e6:.2f} M params)")
    table.add_row("validate + stage, off the hot path p50 / p99", f"{sw['offer_p50_ms']:.1f} / {sw['offer_p99_ms']:.1f} ms")
    table.add_row(f"trainer (batch {tr['batch']}, unroll {tr['unroll']})",
                  f"{tr['tokens_per_s']:.0f} tokens/s, {tr['update_ms']:.0f} ms/update")
    table.add_row(f"gate evaluation ({tr['gate_samples']} samples, k={tr['gate_k']})",
                  f"{tr['gate_eval_ms_per_head']:.0f} ms per head")
    table.add_row(f"log batch PUSH -> PULL ({lb['log_batch_bytes'] / 1024:.0f} KiB) p50 / p99",
                  f"{lb['log_p50_ms']:.2f} / {lb['log_p99_ms']:.2f} ms")
    table.add_row("publish -> validated + staged on a server p50 / p99",
                  f"{lb['publish_to_staged_p50_ms']:.1f} / {lb['publish_to_staged_p99_ms']:.1f} ms")
    every = defaults.gate_every
    cycle = lb["log_p50_ms"] + every * tr["update_ms"] + 2 * tr["gate_eval_ms_per_head"] \
        + lb["publish_to_staged_p50_ms"] + lb["apply_p50_ms"]
    results["loopback"]["cycle_ms"] = cycle
    results["loopback"]["gate_every"] = every
    table.add_row(f"log -> applied, one cycle (gate_every={every}; + <= 1 engine step)", f"{cycle:.0f} ms")
    if "logging" in results:
        lg = results["logging"]
        overhead = 100.0 * (1 - lg["tokens_per_s_logged"] / lg["tokens_per_s_plain"])
        lg["tokens_per_s_overhead_pct"] = overhead
        table.add_row("logging: time in step listeners (goal <= 1%)",
                      f"{lg['log_us_per_step']:.0f} us/step = {lg['log_share_of_step_pct']:.2f}% of a "
                      f"{lg['mean_step_ms']:.0f} ms step")
        table.add_row("logging: engine tokens/s plain vs logged (noisy)",
                      f"{lg['tokens_per_s_plain']:.1f} vs {lg['tokens_per_s_logged']:.1f} ({overhead:+.1f}%)")
    out.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    app()
