"""Shared fixtures: a tiny random Llama for engine mechanics, the real SmolLM2 runtime for acceptance tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adaspec.core.config import Settings, load_settings
from adaspec.core.datasets import shared_data_dir
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


@pytest.fixture(scope="session")
def tiny_target() -> Target:
    return make_tiny_target()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def real_settings() -> Settings:
    return load_settings(batch_size=4, max_new_tokens=128)


@pytest.fixture(scope="session")
def real_runtime(real_settings):
    """The real SmolLM2-135M-Instruct with every registered drafter (needs `adaspec models fetch`)."""
    from adaspec.core.drafters.registry import available
    from adaspec.core.errors import ModelError
    from adaspec.core.runtime import Runtime

    try:
        return Runtime.load(real_settings, drafter_names=list(available()))
    except ModelError as exc:
        pytest.fail(f"real model not available ({exc}); run `adaspec models fetch` first")


def pytest_configure(config) -> None:
    torch.set_num_threads(int(os.environ.get("ADASPEC_TEST_THREADS", torch.get_num_threads())))
