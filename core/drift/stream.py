"""The drift stream: phases of prompts read from JSONL files, served in order (one request after another).

`--phase NAME=PATH[:N]` adds a phase; the default stream walks chat -> code -> code edits -> math -> chat,
the kind of drift a static drafter decays under; `--stream code` drifts from chat into Go and Java (languages
nothing the static head trained on is written in) and back to unseen chat. A phase name may repeat (the stream returns to it); each
occurrence takes the next unused prompts of its file, so the second MT-bench phase is unseen traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from adaspec.core.datasets import load_prompts, shared_data_dir
from adaspec.core.errors import RequestError

DEFAULT_PHASES = ("mt_bench", "humaneval", "code_edit", "gsm8k", "mt_bench")

#: Named streams: (file stem, requests at the full size) per phase. `code` drifts into languages nothing in the
#: static head's data is written in (real Go and Java completions), then back to unseen chat.
STREAMS: dict[str, tuple[tuple[str, int], ...]] = {
    "default": tuple((n, 32) for n in DEFAULT_PHASES),
    "code": (("mt_bench", 32), ("go_code", 64), ("java_code", 64), ("mt_bench", 32)),
}


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    path: Path
    count: int


@dataclass(frozen=True)
class StreamRequest:
    """One request of the stream: `index` is its position in the stream, `phase_index` which phase it is in."""

    index: int
    phase: str
    phase_index: int
    prompt_id: str
    prompt: str


def parse_phase(text: str, default_count: int) -> PhaseSpec:
    """`NAME=PATH[:N]` (PATH may itself contain ':' only if N is given)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise RequestError(f"--phase {text!r}: expected NAME=PATH[:N]")
    path_s, count = rest, default_count
    head, colon, tail = rest.rpartition(":")
    if colon and tail.isdigit():
        path_s, count = head, int(tail)
    if count < 1:
        raise RequestError(f"--phase {text!r}: N must be >= 1")
    path = Path(path_s).expanduser()
    if not path.is_file():
        raise RequestError(f"--phase {text!r}: no such file {path}")
    return PhaseSpec(name.strip(), path, count)


def default_phases(per_phase: int, data_dir: Path | None = None) -> list[PhaseSpec]:
    return stream_phases("default", per_phase, data_dir)


def stream_phases(name: str, per_phase: int = 32, data_dir: Path | None = None) -> list[PhaseSpec]:
    """The phases of a named stream, each phase's size scaled by per_phase / 32 (the full size at 32)."""
    if name not in STREAMS:
        raise RequestError(f"unknown stream {name!r}: choose one of {', '.join(STREAMS)}")
    d = data_dir or shared_data_dir()
    return [PhaseSpec(n, d / f"{n}.jsonl", max(1, round(count * per_phase / 32))) for n, count in STREAMS[name]]


def build_stream(phases: Sequence[PhaseSpec]) -> list[StreamRequest]:
    """Requests in stream order; repeated files continue where their previous phase stopped."""
    if not phases:
        raise RequestError("the stream needs at least one phase")
    used: dict[Path, int] = {}
    out: list[StreamRequest] = []
    labels = phase_labels(phases)
    for pi, ph in enumerate(phases):
        offset = used.get(ph.path.resolve(), 0)
        rows = load_prompts(ph.path, ph.count, offset=_line_offset(ph.path, offset))
        if len(rows) < ph.count:
            raise RequestError(f"phase {ph.name!r}: {ph.path} has only {offset + len(rows)} prompts, "
                               f"{offset + ph.count} needed")
        used[ph.path.resolve()] = offset + len(rows)
        for row in rows:
            out.append(StreamRequest(len(out), labels[pi], pi, row.id, row.prompt))
    return out


def phase_labels(phases: Sequence[PhaseSpec]) -> list[str]:
    """Unique phase labels in order: a name's second occurrence becomes `name#2` (JSON keys stay unique)."""
    seen: dict[str, int] = {}
    labels = []
    for ph in phases:
        seen[ph.name] = seen.get(ph.name, 0) + 1
        labels.append(ph.name if seen[ph.name] == 1 else f"{ph.name}#{seen[ph.name]}")
    return labels


def _line_offset(path: Path, prompts: int) -> int:
    """Line number after the first `prompts` non-blank lines (load_prompts' offset counts raw lines)."""
    if prompts == 0:
        return 0
    seen = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == prompts:
                    return lineno
    return lineno if seen else 0
