"""SGLang 0.5.17's EAGLE-3 draft checkpoint format, written down once so export and tests check against it.

Everything here was read off the sglang 0.5.17 wheel (paths relative to the `sglang` package); the line
numbers are those of that release. Nothing imports SGLang.

Draft model (`srt/models/llama_eagle3.py`):
* L44-111 `LlamaDecoderLayer` (the single draft layer, layer_id 0 = input layer): q/k/v take 2*hidden
  (L54-67), a `hidden_norm` RMSNorm (L78); forward (L89-111): residual = fused hidden,
  x = cat([input_layernorm(embeds), hidden_norm(hidden)]), attention, post_attention_layernorm(attn, residual)
  then the MLP. The MLP is the plain Llama MLP over `intermediate_size` (L69-76).
* L143-159 `fc`: Linear(target_hidden_size * num_aux -> hidden_size), bias only if config `bias`; num_aux
  from `num_aux_hidden_states`, else len(eagle_config.eagle_aux_hidden_state_layer_ids), else 3 (L148-153).
  Optional `norm_before_fc` / `fc_norm` (L161-188) are off unless the config asks; we never set them.
* L190-197: `num_hidden_layers` draft layers and a final `norm`. L228-238: `fc` is applied only when the
  incoming hidden is wider than the embedding (target aux states); the draft's own fed-back hidden is not.
* L254-260: logits come from norm(h + residual); the hidden fed back to the next draft step is the
  PRE-norm sum (`norm_output` false by default).
* L291-309: tie_word_embeddings -> lm_head = embed_tokens; else `draft_vocab_size: null` means
  `load_lm_head_from_target` (the target's embedding AND head are shared, `srt/speculative/eagle_worker_v2.py`
  L287-292), and `draft_vocab_size` is read unconditionally (L305-307), so the key must exist.
* L314-367 `load_weights`: legacy `midlayer` -> `layers.0` (L326-337), q/k/v and gate/up are stacked into
  qkv_proj / gate_up_proj (L317-324), names get a `model.` prefix (L351, L361); `d2t` holds
  target_id - draft_id per draft id (L339-342), `t2d` is ignored (L344-345).
* Without a `d2t` the draft vocab is the full target vocab (`hot_token_id` None). Rejection sampling
  (`--speculative-use-rejection-sampling`) needs the full vocab (`srt/speculative/eagle_worker_v2.py` L203-217).

Target side (which hidden states the draft gets):
* `srt/models/llama.py` L435-437: before running decoder layer i, if i is in `layers_to_capture`, the
  un-normed `hidden_states + residual` (= the OUTPUT of layer i-1) is captured.
* `srt/models/llama.py` L885-897 `set_eagle3_layers_to_capture`: default `[2, L // 2, L - 3]`; explicit
  `eagle_aux_hidden_state_layer_ids` are shifted by +1 ("for the ith layer, it takes the output of the
  (i-1)th layer"), i.e. explicit ids name layer OUTPUTS, 0-based.
* `srt/model_executor/model_runner_components/spec_aux_hidden_state.py` L80-94: the ids come from the
  DRAFT config's `eagle_config.eagle_aux_hidden_state_layer_ids` (None -> the default above).
* `srt/speculative/eagle_worker_v2.py` L742-753: draft extend input ids are the target's shifted left by
  one: the draft at position t sees (target hidden at t, token t+1) and predicts token t+2.

So in adaspec's convention (index i = output of decoder layer i), SGLang's default is (1, L//2 - 1, L - 4):
(1, 14, 26) for SmolLM2-135M's 30 layers.
"""

from __future__ import annotations

from typing import Any

SGLANG_VERSION = "0.5.17"
ARCHITECTURE = "LlamaForCausalLMEagle3"
SOURCE = "sglang 0.5.17: srt/models/llama_eagle3.py, srt/models/llama.py, srt/speculative/eagle_worker_v2.py"

#: Prefix of the single draft layer's tensors (legacy name, mapped to `layers.0` by load_weights L326-337;
#: EAGLE-3 / SpecForge checkpoints use it, and vLLM maps it too).
LAYER_PREFIX = "midlayer"

#: config.json keys the SGLang loader reads for this architecture, with where.
CONFIG_KEYS: dict[str, str] = {
    "architectures": "model registry: llama_eagle3.py L376 EntryClass",
    "model_type": "HF config class (llama -> LlamaConfig)",
    "hidden_size": "llama_eagle3.py L137-146, llama.py L293",
    "intermediate_size": "llama_eagle3.py L69-76",
    "num_attention_heads": "llama.py L317 (LlamaAttention)",
    "num_key_value_heads": "llama.py L318",
    "head_dim": "llama.py L172-174 (defaults to hidden/heads)",
    "num_hidden_layers": "llama_eagle3.py L190-195; spec_aux_hidden_state.py L73 (KV sizing); must be 1",
    "rms_norm_eps": "llama_eagle3.py L78, L197",
    "hidden_act": "llama_eagle3.py L74-76",
    "vocab_size": "llama_eagle3.py L136-141 (embed_tokens, replaced by the target's)",
    "max_position_embeddings": "llama.py L308",
    "rope_theta": "llama.py L299 (when rope_parameters is absent)",
    "rope_parameters": "llama.py L294-297 (transformers 5 style; takes precedence)",
    "tie_word_embeddings": "llama_eagle3.py L291-293",
    "draft_vocab_size": "llama_eagle3.py L295-307 (read unconditionally; null = LM head from target)",
    "eagle_config": "spec_aux_hidden_state.py L83-91; llama_eagle3.py L149-153 (aux layer ids)",
}

#: Keys inside `eagle_config`.
EAGLE_CONFIG_KEYS = ("eagle_aux_hidden_state_layer_ids", "use_aux_hidden_state")


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """SGLang's default EAGLE-3 capture layers, as OUTPUT indices of decoder layers (adaspec convention).

    llama.py L892 captures the inputs of layers [2, L//2, L-3], i.e. the outputs of [1, L//2-1, L-4].
    """
    ids = (1, num_layers // 2 - 1, num_layers - 4)
    if len(set(ids)) != 3 or min(ids) < 0:
        raise ValueError(
            f"a {num_layers}-layer target has no 3 distinct default EAGLE-3 layers {ids}; pass aux_layers"
        )
    return ids


def tensor_shapes(
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    target_hidden_size: int | None = None,
    num_aux: int = 3,
    draft_vocab_size: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Exact tensor names and shapes of the checkpoint (`draft_vocab_size` None = full vocab: no lm_head/d2t/t2d).

    A reduced draft vocab adds the draft's own `lm_head.weight` [draft_vocab, d] (llama_eagle3.py L298-303),
    `d2t` [draft_vocab] int64 (L339-342) and `t2d` [vocab] bool (kept for other readers; SGLang skips it).
    """
    d, th = hidden_size, target_hidden_size or hidden_size
    p = LAYER_PREFIX
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (d, th * num_aux),
        f"{p}.hidden_norm.weight": (d,),
        f"{p}.input_layernorm.weight": (d,),
        f"{p}.post_attention_layernorm.weight": (d,),
        f"{p}.self_attn.q_proj.weight": (num_heads * head_dim, 2 * d),
        f"{p}.self_attn.k_proj.weight": (num_kv_heads * head_dim, 2 * d),
        f"{p}.self_attn.v_proj.weight": (num_kv_heads * head_dim, 2 * d),
        f"{p}.self_attn.o_proj.weight": (d, num_heads * head_dim),
        f"{p}.mlp.gate_proj.weight": (intermediate_size, d),
        f"{p}.mlp.up_proj.weight": (intermediate_size, d),
        f"{p}.mlp.down_proj.weight": (d, intermediate_size),
        "norm.weight": (d,),
    }
    if draft_vocab_size is not None:
        if vocab_size is None:
            raise ValueError("a reduced draft vocab needs the target vocab_size for t2d")
        shapes["lm_head.weight"] = (draft_vocab_size, d)
        shapes["d2t"] = (draft_vocab_size,)
        shapes["t2d"] = (vocab_size,)
    return shapes


def check_config(cfg: dict[str, Any]) -> list[str]:
    """Problems with a config.json dict for SGLang's EAGLE-3 loader (empty list = fine)."""
    problems = [f"missing config key {k!r} ({why})" for k, why in CONFIG_KEYS.items() if k not in cfg]
    if cfg.get("architectures") != [ARCHITECTURE]:
        problems.append(f"architectures must be [{ARCHITECTURE!r}], got {cfg.get('architectures')!r}")
    if cfg.get("num_hidden_layers") != 1:
        problems.append(f"num_hidden_layers must be 1, got {cfg.get('num_hidden_layers')!r}")
    eagle = cfg.get("eagle_config") or {}
    for k in EAGLE_CONFIG_KEYS:
        if k not in eagle:
            problems.append(f"missing eagle_config.{k}")
    if cfg.get("tie_word_embeddings") and cfg.get("draft_vocab_size") not in (None, cfg.get("vocab_size")):
        problems.append("tie_word_embeddings with a reduced draft vocab: SGLang would use the embedding as head")
    return problems
