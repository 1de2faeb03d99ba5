"""`adaspec bench speed`: plain vs speculative decoding, side by side in one run, on the shared datasets.

Every drafter decodes the same prompts at the same batch size right after the plain run, so the tokens/s
ratios are measured under the same conditions; greedy outputs are also compared (a speedup that changes
the output would not count). Drafter state is reset before each run: the suffix drafter would otherwise
replay the plain run's outputs from its cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from adaspec.core.datasets import load_prompts
from adaspec.core.runtime import Runtime


@dataclass
class SpeedRow:
    dataset: str
    drafter: str
    requests: int
    tokens: int
    target_forwards: int
    tau: float
    wall_s: float
    tokens_per_s: float
    speedup: float
    identical: bool


def run_speed(rt: Runtime, datasets: dict[str, Path], limit: int, drafters: list[str],
              console: Console) -> list[SpeedRow]:
    rows: list[SpeedRow] = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("bench speed", total=len(datasets) * (1 + len(drafters)))
        for name, path in datasets.items():
            prompts = [rt.target.encode(r.prompt, chat=rt.settings.chat_template) for r in load_prompts(path, limit)]
            plain_tokens = None
            plain_tps = 0.0
            for drafter in ["none", *drafters]:
                bar.update(task, description=f"{name}: {drafter}")
                rt.reset_drafters()  # no drafter may remember outputs of the runs before it
                t0 = time.perf_counter()
                res = rt.generate(prompts, drafter=drafter)
                wall = time.perf_counter() - t0
                toks = sum(len(r.output_tokens) for r in res)
                fw = sum(r.target_forwards for r in res)
                tps = toks / wall
                outs = [r.output_tokens for r in res]
                if drafter == "none":
                    plain_tokens, plain_tps = outs, tps
                rows.append(SpeedRow(name, drafter, len(prompts), toks, fw, toks / fw, wall, tps,
                                     tps / plain_tps, outs == plain_tokens))
                bar.advance(task)
    return rows


def print_speed(rows: list[SpeedRow], console: Console, title: str) -> None:
    table = Table(title=title)
    for col in ("dataset", "drafter", "tokens", "forwards", "tau", "tok/s", "speedup", "identical"):
        table.add_column(col, justify="right" if col not in ("dataset", "drafter") else "left")
    for r in rows:
        table.add_row(r.dataset, r.drafter, str(r.tokens), str(r.target_forwards), f"{r.tau:.2f}",
                      f"{r.tokens_per_s:.1f}", f"{r.speedup:.2f}x", "yes" if r.identical else "[red]NO[/]")
    console.print(table)


def write_json(rows: list[SpeedRow], path: Path, meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
