"""Write and read SGLang 0.5.17's EAGLE-3 draft checkpoint (config.json + model.safetensors).

This is also adaspec's own on-disk format for the static head: one format, so what we evaluate is exactly
what SGLang serves (`--speculative-algorithm EAGLE3 --speculative-draft-model-path DIR`). The target's
embedding and LM head are not written: with `draft_vocab_size: null` SGLang shares the target's
(`load_lm_head_from_target`); only a reduced draft vocabulary writes its own `lm_head.weight` + `d2t`/`t2d`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from torch import Tensor

from adaspec.core import fsio
from adaspec.core.heads import sglang_eagle3_format as fmt
from adaspec.core.heads.eagle3 import Eagle3Config, Eagle3Head

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def sglang_config(cfg: Eagle3Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for `LlamaForCausalLMEagle3` (keys: `fmt.CONFIG_KEYS`), plus an `adaspec` block SGLang ignores."""
    reduced = bool(cfg.draft_vocab)
    out: dict[str, Any] = {
        "architectures": [fmt.ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": cfg.hidden_act,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": False,
        "draft_vocab_size": len(cfg.draft_vocab) if reduced else None,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layers),
            "use_aux_hidden_state": True,
        },
        "adaspec": {"format_version": 1, "target_num_layers": cfg.target_num_layers},
    }
    if cfg.target_hidden_size and cfg.target_hidden_size != cfg.hidden_size:
        out["target_hidden_size"] = cfg.target_hidden_size
    return out


def export_sglang(head: Eagle3Head, out_dir: Path | str, dtype: torch.dtype = torch.float32) -> Path:
    """Write `head` as an SGLang EAGLE-3 draft model dir; returns the dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = head.cfg
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()}
    tensors["fc.weight"] = head.folded_fc_weight().detach().to("cpu", dtype).contiguous()
    if cfg.draft_vocab:
        ids = torch.tensor(cfg.draft_vocab, dtype=torch.long)
        tensors["lm_head.weight"] = head.lm_head_weight.detach().to("cpu", dtype).contiguous()
        tensors["d2t"] = ids - torch.arange(len(ids))
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        tensors["t2d"] = t2d
    fsio.save_safetensors(tensors, out / WEIGHTS_FILE, {"format": "pt"})
    fsio.write_json(out / CONFIG_FILE, sglang_config(cfg, dtype))
    return out


def _config_from_sglang(cfg: dict[str, Any], d2t: Tensor | None, target_num_layers: int | None) -> Eagle3Config:
    eagle = cfg.get("eagle_config") or {}
    layers = int((cfg.get("adaspec") or {}).get("target_num_layers") or target_num_layers or 0)
    aux = eagle.get("eagle_aux_hidden_state_layer_ids") or fmt.default_aux_layers(layers)
    rope = cfg.get("rope_parameters") or {}
    draft_vocab: tuple[int, ...] = ()
    if d2t is not None:
        draft_vocab = tuple((d2t.long() + torch.arange(d2t.shape[0])).tolist())
        if draft_vocab == tuple(range(int(cfg["vocab_size"]))):
            draft_vocab = ()  # an identity map is the full vocabulary
    heads = int(cfg["num_attention_heads"])
    return Eagle3Config(
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        vocab_size=int(cfg["vocab_size"]),
        aux_layers=tuple(int(i) for i in aux),
        target_num_layers=layers,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        target_hidden_size=cfg.get("target_hidden_size"),
        draft_vocab=draft_vocab,
    )


def load_sglang(path: Path | str, target: Any, dtype: torch.dtype | None = None) -> Eagle3Head:
    """Read an SGLang EAGLE-3 draft dir (ours, or a `midlayer.`/`layers.0.` checkpoint) onto `target`."""
    path = Path(path)
    cfg_json = json.loads((path / CONFIG_FILE).read_text())
    if cfg_json.get("architectures") != [fmt.ARCHITECTURE]:
        raise ValueError(f"{path}: not an {fmt.ARCHITECTURE} checkpoint ({cfg_json.get('architectures')})")
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    cfg = _config_from_sglang(cfg_json, tensors.get("d2t"), target.num_layers)
    model = target.model
    head = Eagle3Head(cfg, model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    state = {}
    for name, t in tensors.items():
        name = name.removeprefix("model.").replace("layers.0.", f"{fmt.LAYER_PREFIX}.")
        if name in ("d2t", "t2d", "lm_head.weight", "embed_tokens.weight"):
            continue  # vocab maps and the borrowed target tensors
        state[name] = t
    head.load_state_dict(state, strict=True)
    head = head.to(device=target.device, dtype=dtype or torch.float32)
    if "lm_head.weight" in tensors:  # a reduced vocab's own head rows win over the target's
        object.__setattr__(head, "lm_head_weight", tensors["lm_head.weight"].to(target.device))
    return head


def check_export(path: Path | str) -> list[str]:
    """Problems of a written dir against the checked-in SGLang format (names, shapes, dtypes, config keys)."""
    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    problems = fmt.check_config(cfg)
    expected = fmt.tensor_shapes(
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
        target_hidden_size=cfg.get("target_hidden_size"),
        num_aux=len(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]),
        draft_vocab_size=cfg.get("draft_vocab_size"), vocab_size=cfg["vocab_size"],
    )
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        got = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    for name in sorted(set(expected) - set(got)):
        problems.append(f"missing tensor {name}")
    for name in sorted(set(got) - set(expected)):
        problems.append(f"unexpected tensor {name}")
    for name in sorted(set(got) & set(expected)):
        if got[name] != expected[name]:
            problems.append(f"{name}: shape {got[name]} != expected {expected[name]}")
    return problems


def read_draft_vocab(path: Path | str) -> list[int] | None:
    """The reduced draft vocabulary (target ids) of an exported head, or None for the full vocabulary."""
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        if "d2t" not in f.keys():
            return None
        d2t = f.get_tensor("d2t").long()
    return (d2t + torch.arange(d2t.shape[0])).tolist()
