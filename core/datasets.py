"""Prompt datasets in the shared JSONL format: {"id", "source", "category", "prompt"} per line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adaspec.core.errors import RequestError


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    category: str = ""


def load_prompts(path: Path, limit: int | None = None, offset: int = 0) -> list[PromptRow]:
    """Read rows [offset, offset+limit) of a JSONL prompt file; bad lines are errors naming the line."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"prompt file not found: {path}")
    rows: list[PromptRow] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= offset or not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompt = obj["prompt"]
            except (ValueError, KeyError, TypeError):
                raise RequestError(f"{path}:{lineno}: not a JSON object with a 'prompt' field") from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError(f"{path}:{lineno}: empty prompt")
            rows.append(PromptRow(str(obj.get("id", f"{path.stem}/{lineno}")), prompt, str(obj.get("category", ""))))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise RequestError(f"no prompts in {path}")
    return rows


def shared_data_dir() -> Path:
    """`../shared/data` next to the checkout (or ADASPEC_DATA_DIR), where the benchmark datasets live."""
    import os

    env = os.environ.get("ADASPEC_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent  # repo root in an editable install
    for cand in (here.parent / "shared" / "data", here / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    raise RequestError("cannot find the shared datasets; set ADASPEC_DATA_DIR to the folder with mt_bench.jsonl")


def dataset_paths(specs: list[str]) -> dict[str, Path]:
    """`NAME` (the shared data dir's NAME.jsonl) or `NAME=PATH.jsonl` per spec -> {name: path}, in order."""
    paths: dict[str, Path] = {}
    for d in specs:
        name, _, path = d.partition("=")
        paths[name] = Path(path) if path else shared_data_dir() / f"{name}.jsonl"
    return paths
