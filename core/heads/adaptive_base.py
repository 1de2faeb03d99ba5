"""The head base: everything the sidecar needs to rebuild the servers' adaptive head without the target model.

One safetensors file holds the head's config, the target's frozen embedding and LM head (stored once when
tied), the draft vocabulary the servers restrict the head to (when they do) and the head's initial trainable
weights (version 0, exactly what the servers start from). It is written atomically (temp file + rename) and
carries a fingerprint of the frozen tensors, so a checkpoint trained against one base is never resumed
against another. The draft vocabulary travels with the base so that the sidecar trains and gates exactly the
drafter the servers run: a head drafting over the static head's 8k ids cannot propose a token outside them,
and a gate scoring the full vocabulary would credit it with tokens it never drafts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from adaspec.core import fsio
from adaspec.core.errors import ConfigError
from adaspec.core.heads.adaptive import AdaptiveConfig, AdaptiveHead

FORMAT = "adaspec-adaptive-base/1"
_EMBED, _LM_HEAD, _DRAFT_IDS, _INIT = "frozen.embed", "frozen.lm_head", "frozen.draft_ids", "init."


@dataclass
class HeadBase:
    """A head's frozen context plus its initial weights; `build()` makes a fresh trainable head from it."""

    config: AdaptiveConfig
    embed: Tensor
    lm_head: Tensor
    init: dict[str, Tensor]
    fingerprint: str
    draft_ids: Tensor | None = None  # [n] target ids the servers draft over; None = the full vocabulary

    def build(self, embed: Tensor | None = None, lm_head: Tensor | None = None, **overrides: Any) -> AdaptiveHead:
        """A head at version 0 (`overrides` replace config fields such as lr), over the base's draft vocabulary;
        `embed`/`lm_head` (a server's own tensors, same shape) replace the base's frozen copies."""
        cfg = dataclasses.replace(self.config, **overrides)
        head = AdaptiveHead(cfg, self.embed if embed is None else embed, self.lm_head if lm_head is None else lm_head)
        head.load_state_dict(self.init, strict=True)
        if self.draft_ids is not None:
            head.set_draft_vocab(self.draft_ids)
        return head.eval()


def fingerprint(cfg: AdaptiveConfig, embed: Tensor, lm_head: Tensor, draft_ids: Tensor | None = None) -> str:
    """sha256 over the config (shape-defining fields), the frozen tensors' bytes and the draft vocabulary (only
    when there is one: a full-vocabulary base keeps the fingerprint it always had)."""
    h = hashlib.sha256()
    h.update(json.dumps({"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}, sort_keys=True).encode())
    frozen = (embed, lm_head) if draft_ids is None else (embed, lm_head, draft_ids)
    for t in frozen:
        flat = t.detach().to("cpu", torch.float32 if t.is_floating_point() else torch.int64).contiguous()
        h.update(str(tuple(flat.shape)).encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _init_checksum(init: dict[str, Tensor]) -> str:
    from adaspec.core.online.wire import named_tensor, weights_checksum

    return weights_checksum([named_tensor(n, t) for n, t in init.items()])


def write_base(head: AdaptiveHead, path: Path | str) -> Path:
    """Write `head` (its current weights as version 0) as a base file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    embed, lm_head = head.embed_weight, head.lm_head_weight
    tied = embed.data_ptr() == lm_head.data_ptr() and embed.shape == lm_head.shape
    tensors = {_EMBED: embed.detach().to("cpu").contiguous()}
    if not tied:
        tensors[_LM_HEAD] = lm_head.detach().to("cpu").contiguous()
    draft_ids = head.draft_ids.detach().to("cpu", torch.int64).contiguous() if head.draft_ids is not None else None
    if draft_ids is not None:
        tensors[_DRAFT_IDS] = draft_ids
    for name, t in head.state_dict().items():
        tensors[_INIT + name] = t.detach().to("cpu").contiguous()
    meta = {
        "format": FORMAT,
        "config": json.dumps(head.cfg.to_json()),
        "tied": "1" if tied else "0",
        "fingerprint": fingerprint(head.cfg, embed, lm_head, draft_ids),
        "init_checksum": _init_checksum({k[len(_INIT):]: v for k, v in tensors.items() if k.startswith(_INIT)}),
    }
    return fsio.save_safetensors(tensors, path, meta)


def read_base(path: Path | str, verify: bool = True) -> HeadBase:
    """Load and check a base file; ConfigError names what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"head base {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ConfigError(f"{path}: not a head base (format {meta.get('format')!r}, want {FORMAT})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        cfg = AdaptiveConfig(**json.loads(meta["config"]))
    except ConfigError:
        raise
    except Exception as exc:  # safetensors/json/dataclass errors: a damaged or foreign file
        raise ConfigError(f"cannot read head base {path}: {type(exc).__name__}: {exc}") from None
    embed = tensors.pop(_EMBED, None)
    lm_head = tensors.pop(_LM_HEAD, None) if meta.get("tied") != "1" else embed
    draft_ids = tensors.pop(_DRAFT_IDS, None)
    if embed is None or lm_head is None:
        raise ConfigError(f"{path}: frozen embedding or LM head missing")
    if draft_ids is not None and (draft_ids.dim() != 1 or draft_ids.is_floating_point() or not len(draft_ids)
                                  or int(draft_ids.min()) < 0 or int(draft_ids.max()) >= cfg.vocab_size
                                  or len(torch.unique(draft_ids)) != len(draft_ids)):
        raise ConfigError(f"{path}: the draft vocabulary must be distinct target ids in [0, {cfg.vocab_size})")
    want = (cfg.vocab_size, cfg.hidden_size)
    if tuple(embed.shape) != want or tuple(lm_head.shape) != want:
        raise ConfigError(f"{path}: frozen tensors {tuple(embed.shape)}/{tuple(lm_head.shape)} do not match {want}")
    init = {k[len(_INIT):]: v for k, v in tensors.items() if k.startswith(_INIT)}
    fp = meta.get("fingerprint", "")
    if verify and fingerprint(cfg, embed, lm_head, draft_ids) != fp:
        raise ConfigError(f"{path}: fingerprint mismatch (file damaged?)")
    if verify and _init_checksum(init) != meta.get("init_checksum"):
        raise ConfigError(f"{path}: initial weights checksum mismatch (file damaged?)")
    base = HeadBase(cfg, embed, lm_head, init, fp, draft_ids)
    try:
        base.build()
    except RuntimeError as exc:  # initial weights do not fit the config
        raise ConfigError(f"{path}: initial weights do not match the config: {exc}"[:500]) from None
    return base


def base_from_model(path: Path, inner_size: int, seed: int) -> HeadBase:
    """Build a fresh head for the configured target model (ADASPEC_* settings), over the draft vocabulary the
    servers' registry gives it under the same settings, write it to `path`, load it."""
    from adaspec.core.config import load_settings
    from adaspec.core.drafters.registry import adaptive_draft_ids
    from adaspec.core.target import load_target

    settings = load_settings(device="cpu")
    target = load_target(settings)
    head = AdaptiveHead.for_target(target, inner_size=inner_size, seed=seed)
    ids = adaptive_draft_ids(settings)
    if ids is not None:
        head.set_draft_vocab(ids)
    write_base(head, path)
    del target
    return read_base(path)
