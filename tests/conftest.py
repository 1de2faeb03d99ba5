"""Shared fixtures: a tiny random Llama for engine mechanics, the real SmolLM2 runtime for acceptance tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adaspec.core.config import Settings, load_settings
from adaspec.core.datasets import shared_data_dir
from adaspec.core.target import Target
from tiny_models import make_tiny_target


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box OpenMP spinning costs 10-100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
