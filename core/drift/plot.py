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


def plot_drift(result: dict[str, Any], path: Path, width: int = 8) -> Path:
    """One line per policy (rolling mean of per-request tau), dashed verticals at phase starts."""
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    for name, pol in result["policies"].items():
        tau = pol["per_request_tau"]
        style = {"linestyle": ":"} if name == "oracle" else {}
        lw = 2.4 if name == "atlas" else 1.4
        ax.plot(range(1, len(tau) + 1), rolling(tau, width), label=f"{name} (tau {pol['tau']:.2f})", lw=lw, **style)
    start = 0
    ymax = ax.get_ylim()[1]
    for ph in result["stream"]["phases"]:
        ax.axvline(start + 0.5, color="grey", ls="--", lw=0.8)
        ax.text(start + 1, ymax * 0.98, ph["name"], va="top", fontsize=9, color="dimgrey")
        start += ph["requests"]
    ax.set_xlabel("request (stream order)")
    ax.set_ylabel(f"tau: tokens per target forward (rolling mean of {width} requests)")
    mode = result["mode"]
    ax.set_title(f"adaspec drift benchmark ({mode}): batch {result['stream']['batch_size']}, "
                 f"{result['stream']['max_new_tokens']} new tokens, greedy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
