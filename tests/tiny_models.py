"""Tiny random models for tests of mechanics (never of quality)."""

from __future__ import annotations

import torch

from adaspec.core.target import Target


def make_tiny_target(vocab: int = 97, layers: int = 2, context: int = 256, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> Target:
    """A random 2-layer Llama: fast, deterministic, enough to test mechanics (never quality)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return Target(model, None, torch.device("cpu"), dtype, frozenset({2}), context, "tiny-llama")
