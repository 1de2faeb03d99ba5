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


def make_tiny_chat_target(context: int = 512, seed: int = 0) -> Target:
    """A random tiny Llama over the real model's tokenizer and vocabulary: text in, text out, in milliseconds
    (for the server's mechanics: parsing, streaming, stop strings, errors). Needs `adaspec models fetch`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adaspec.core.config import load_settings
    from adaspec.core.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(load_settings()), local_files_only=True)
    torch.manual_seed(seed)
    eos = int(tok.eos_token_id)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=context, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, initializer_range=0.5,  # varied text, not one token
    )
    model = LlamaForCausalLM(cfg).eval()
    return Target(model, tok, torch.device("cpu"), torch.float32, frozenset({eos}), context, "tiny-chat")
