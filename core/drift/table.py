"""The drift benchmark's console tables (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _phase_table(title: str, phases: list[str]) -> Table:
    """A table with a row per policy: a column per phase, then the whole stream."""
    t = Table(title=title)
    t.add_column("policy")
    for p in phases:
        t.add_column(p, justify="right")
    t.add_column("stream", justify="right")
    return t


def print_drift(result: dict[str, Any], console: Console) -> None:
    phases = [p["name"] for p in result["stream"]["phases"]]
    live = result["mode"] == "live"
    t = _phase_table(f"drift ({result['mode']}): tau per phase [modeled speedup vs none"
                     + (", wall tok/s" if live else "") + "]", phases)
    for name, pol in result["policies"].items():
        cells = []
        for p in phases:
            ph = pol["phases"][p]
            cell = f"{ph['tau']:.2f} [{ph['modeled_speedup'] or 0:.2f}x"
            cell += f", {ph['wall_tok_s']:.1f}]" if live and ph["wall_tok_s"] else "]"
            cells.append(cell)
        cells.append(f"{pol['tau']:.2f} [{pol['modeled_speedup'] or 0:.2f}x]")
        t.add_row(name, *cells)
    console.print(t)
    r = Table(title="recovery: requests until rolling tau is within 10% of the phase plateau")
    r.add_column("policy")
    for p in phases:
        r.add_column(p, justify="right")
    for name, pol in result["policies"].items():
        r.add_row(name, *[str(pol["phases"][p]["recovery_requests"]) for p in phases])
    console.print(r)
    w = Table(title=f"tau per {result['stream']['window']}-request window")
    w.add_column("policy")
    n = max(len(p["windows"]) for p in result["policies"].values())
    for i in range(n):
        w.add_column(str(i + 1), justify="right")
    for name, pol in result["policies"].items():
        w.add_row(name, *[f"{x:.2f}" for x in pol["windows"]])
    console.print(w)
    acc = result.get("acceptance", {})
    console.print(f"controller decision time: {result['controller_us_per_request_step']:.1f} us per request-step "
                  f"at batch {result['controller_batch']} (goal <= 50)")
    for key in ("atlas_vs_static_later_phases", "atlas_vs_static_min_window", "atlas_vs_best_single_min_phase",
                "atlas_minus_sglang_ema_tau"):
        if key in acc:
            console.print(f"{key}: {acc[key]:.3f}")
    if "pass" in acc:
        console.print("checks (tau): " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in acc["pass"].items()))
    gp = acc.get("goodput")
    if gp:
        console.print("on modeled speed: " + ", ".join(f"{k} {v:.3f}" for k, v in gp.items() if k != "pass"))
        console.print("checks (speed): " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in gp["pass"].items()))
    wall = acc.get("wall")
    if wall:
        console.print(
            "on the wall clock: ATLAS / plain per phase " + " ".join(f"{v:.2f}" for v in
                                                            wall["atlas_vs_plain_per_phase"].values())
            + (", / best single per phase " + " ".join(f"{v:.2f}" for v in
                                                       wall["atlas_vs_best_single_per_phase"].values())
               if "atlas_vs_best_single_per_phase" in wall else "")
            + f"; stream {wall['atlas_vs_plain_stream']:.2f}x plain"
            + (f", {wall['atlas_vs_best_single_stream']:.2f}x best single" if "atlas_vs_best_single_stream" in wall
               else "")
            + f"; plain decoding run twice differs by up to {wall['plain_noise']:.0%} in a phase; modeled speedup "
            f"{wall['atlas_modeled_speedup']:.2f}x vs wall {wall['atlas_wall_speedup']:.2f}x")
        console.print("checks (wall): " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in wall["pass"].items()))
    if "sidecar" in result:
        sc = result["sidecar"]
        console.print(f"sidecar: versions applied {sc['versions_applied']}, logs dropped {sc['logs_dropped']}")
    for name, pol in result["policies"].items():
        if "learner" in pol:
            ln = pol["learner"]
            console.print(f"{name}: in-process sidecar {ln['updates']} updates, {ln['gates']} gates, "
                          f"{ln['published']} versions published")
    bad = [k for k, v in result["identical_outputs"].items() if not v]
    console.print("outputs identical across policies: " + ("yes" if not bad else f"NO ({', '.join(bad)})"))


def print_demo(result: dict[str, Any], console: Console) -> None:
    """Per phase and policy: wall tok/s, tau, the share of accepted draft tokens per drafter, versions swapped in."""
    phases = [p["name"] for p in result["stream"]["phases"]]
    t = _phase_table("live, this machine: wall tok/s | tau | accepted draft tokens by drafter (share)", phases)
    for name, pol in result["policies"].items():
        cells = []
        for p in phases:
            ph = pol["phases"][p]
            acc = ph.get("accepted_by_drafter") or {}
            total = sum(acc.values())
            mix = " ".join(f"{d} {v / total:.0%}" for d, v in sorted(acc.items(), key=lambda kv: -kv[1]) if v) \
                if total else "-"
            cells.append(f"{ph['wall_tok_s'] or 0:.1f} | {ph['tau']:.2f} | {mix}")
        wall = sum(pol["phases"][p]["tokens"] / pol["phases"][p]["wall_tok_s"] for p in phases
                   if pol["phases"][p]["wall_tok_s"])
        cells.append(f"{pol['tokens'] / wall if wall else 0:.1f} | {pol['tau']:.2f}")
        t.add_row(name, *cells)
    console.print(t)
    for name, pol in result["policies"].items():
        sc = pol.get("sidecar")
        if sc:
            console.print(f"{name}: the sidecar published and the server swapped in versions {sc['versions_applied']} "
                          f"between steps (logs dropped: {sc['logs_dropped']})")
    bad = [k for k, v in result["identical_outputs"].items() if not v]
    console.print("outputs identical to plain decoding: " + ("yes" if not bad else f"NO ({', '.join(bad)})"))


def print_profile(result: dict[str, Any], console: Console) -> None:
    """Live runs: milliseconds per decode step by stage, one column per policy (plain decoding's beside
    ATLAS's: every overhead is a number), the measured step wall time, and the learner's share of the cores."""
    pols = {n: p for n, p in result["policies"].items() if p.get("profile")}
    if not pols:
        return
    stages: list[str] = []
    for p in pols.values():
        stages += [s for s in p["profile"]["ms_per_step"] if s not in stages]
    from adaspec.core.engine.profile import stage_rank

    order = {s: i for i, s in enumerate(stages)}
    stages.sort(key=lambda s: (stage_rank(s), order[s]))
    t = Table(title="per-step profile (live): ms per decode step")
    t.add_column("stage")
    for n in pols:
        t.add_column(n, justify="right")
    for s in stages:
        t.add_row(s, *[f"{p['profile']['ms_per_step'].get(s, 0.0):.2f}" for p in pols.values()])
    t.add_row("sum of stages", *[f"{sum(p['profile']['ms_per_step'].values()):.2f}" for p in pols.values()])
    t.add_row("step wall (measured)", *[f"{p['profile']['wall_ms_per_step']:.2f}" for p in pols.values()])
    t.add_row("decode steps", *[str(p["profile"]["steps"]) for p in pols.values()])
    t.add_row("batch (requests per step)", *[f"{p['profile']['batch_per_step']:.2f}" for p in pols.values()])
    t.add_row("tokens verified per step", *[f"{p['profile']['fed_tokens_per_step']:.2f}" for p in pols.values()])
    cpu, earned = [], []
    for p in pols.values():
        sc = p.get("sidecar") or {}
        cpu.append(f"{sc['cpu_s']:.1f} s ({sc['cpu_s'] / max(1e-9, sc['wall_s']):.0%})"
                   if sc.get("cpu_s") is not None else "-")
        earned.append(f"{sc['learner_updates']} / {sc['learner_earned_fraction']:.1%} / {sc['learner_cpu_share']:.3f}"
                      if sc.get("learner_updates") is not None else "-")
    t.add_row("sidecar CPU (share of a core)", *cpu)
    t.add_row("learner updates / drafter's earned share / cores", *earned)
    console.print(t)
    labels = [ph["name"] for ph in result["stream"]["phases"]]
    if not all("phases" in p["profile"] for p in pols.values()):
        return
    t = Table(title="per phase (the batch's oldest request's): step wall ms / forward ms / tokens verified per step")
    t.add_column("phase")
    for n in pols:
        t.add_column(n, justify="right")
    for lab in labels:
        cells = []
        for p in pols.values():
            ph = p["profile"]["phases"].get(lab)
            cells.append("-" if not ph or not ph["steps"] else
                         f"{ph['wall_ms_per_step']:.1f} / {ph['ms_per_step'].get('forward', 0.0):.1f} / "
                         f"{ph['fed_tokens_per_step']:.2f}")
        t.add_row(lab, *cells)
    console.print(t)
