"""Rolling tau over the stream per policy, with the phase boundaries marked (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rolling(values: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plot_drift(result: dict[str, Any], path: Path, width: int = 8, title: str = "adaspec drift benchmark") -> Path:
    """One line per policy (rolling mean of per-request tau), dashed verticals at phase starts; a live run
    adds a second panel with each request's wall tokens/s (rolling mean)."""
    live = result["mode"] == "live"
    fig, axes = plt.subplots(2 if live else 1, 1, figsize=(11, 8.5 if live else 5.5), dpi=110, squeeze=False,
                             sharex=True)
    panels = [("per_request_tau", f"tau: tokens per target forward (rolling mean of {width})", "tau")]
    if live:
        panels.append(("per_request_tok_s", f"wall tokens/s per request (rolling mean of {width})", "tok_s"))
    for ax, (key, ylabel, what) in zip(axes[:, 0], panels):
        for name, pol in result["policies"].items():
            values = [v or 0.0 for v in pol.get(key) or []]
            if not values:
                continue
            style = {"linestyle": ":"} if name == "oracle" else {}
            lw = 2.4 if name == "atlas" else 1.4
            label = f"{name} (tau {pol['tau']:.2f})" if what == "tau" else name
            ax.plot(range(1, len(values) + 1), rolling(values, width), label=label, lw=lw, **style)
        start = 0
        ymax = ax.get_ylim()[1]
        for ph in result["stream"]["phases"]:
            ax.axvline(start + 0.5, color="grey", ls="--", lw=0.8)
            ax.text(start + 1, ymax * 0.98, ph["name"], va="top", fontsize=9, color="dimgrey")
            start += ph["requests"]
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    axes[-1, 0].set_xlabel("request (stream order)")
    axes[0, 0].set_title(f"{title} ({result['mode']}): batch {result['stream']['batch_size']}, "
                         f"{result['stream']['max_new_tokens']} new tokens, greedy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
