"""Shared fixtures: a tiny random Llama for engine mechanics; for acceptance tests the real SmolLM2, loaded once
per test run, and one recording of its greedy traces that every real-model test replays from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adaspec.core.config import Settings, load_settings
from adaspec.core.datasets import load_prompts, shared_data_dir
from adaspec.core.target import Target
from tiny_models import make_tiny_target

#: Every real-model prompt set a test replays, recorded together once (128 new tokens, greedy, batched) on the
#: first use: (dataset, offset, count). Shorter budgets reuse a prefix of these recordings.
REAL_TRACE_SETS = (("mt_bench", 0, 40), ("humaneval", 0, 16), ("code_edit", 0, 24), ("code_edit", 40, 12))
REAL_TRACE_TOKENS = 128
REAL_TRACE_BATCH = 16


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
def real_target(real_settings) -> Target:
    """The real SmolLM2-135M-Instruct, loaded once per test run (needs `adaspec models fetch`)."""
    from adaspec.core.errors import ModelError
    from adaspec.core.target import load_target

    try:
        return load_target(real_settings)
    except ModelError as exc:
        pytest.fail(f"real model not available ({exc}); run `adaspec models fetch` first")


@pytest.fixture(scope="session")
def real_runtime(real_settings, real_target):
    """The real model with every registered drafter."""
    from adaspec.core.drafters.registry import available
    from adaspec.core.runtime import Runtime

    return Runtime.load(real_settings, drafter_names=list(available()), target=real_target)


class RealTraces:
    """Greedy traces of the real model for the prompt sets in REAL_TRACE_SETS, recorded once per cache dir."""

    def __init__(self, settings: Settings, target: Target, data_dir: Path) -> None:
        from adaspec.core.drift.traces import TraceStore, trace_layers

        self.target, self.data_dir = target, data_dir
        self.layers = trace_layers(settings, target)
        self.store = TraceStore(settings.cache_dir / "traces", target)
        every = [p for name, off, n in REAL_TRACE_SETS for p in self.prompts(name, n, off)]
        self.store.ensure(every, REAL_TRACE_TOKENS, self.layers, batch_size=REAL_TRACE_BATCH)

    def prompts(self, name: str, limit: int, offset: int = 0) -> list[list[int]]:
        return [self.target.encode(r.prompt) for r in load_prompts(self.data_dir / f"{name}.jsonl", limit, offset)]

    def get(self, name: str, limit: int, offset: int = 0, new_tokens: int = REAL_TRACE_TOKENS):
        """(prompts, traces) of rows [offset, offset + limit) of a dataset: a subset of what was recorded."""
        inside = any(name == n and off <= offset and offset + limit <= off + count
                     for n, off, count in REAL_TRACE_SETS)
        assert inside and new_tokens <= REAL_TRACE_TOKENS, f"{name}[{offset}:{offset + limit}] is not recorded"
        prompts = self.prompts(name, limit, offset)
        return prompts, self.store.ensure(prompts, new_tokens, self.layers)


@pytest.fixture(scope="session")
def real_traces(real_settings, real_target, data_dir) -> RealTraces:
    return RealTraces(real_settings, real_target, data_dir)


def pytest_configure(config) -> None:
    torch.set_num_threads(int(os.environ.get("ADASPEC_TEST_THREADS", torch.get_num_threads())))


@pytest.fixture(scope="session")
def probe(tmp_path_factory) -> dict:
    """What tests/sglang_probe.py reports from inside real SGLang 0.5.17 (the .venv/sglang-cpu overlay on
    PYTHONPATH of a subprocess): run once per test session, read by the plugin and compose tests."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    work = tmp_path_factory.mktemp("sglang-probe")
    env = dict(os.environ, PYTHONPATH=str(root / ".venv" / "sglang-cpu"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env.pop("ADASPEC_SGLANG_CANDIDATE_STEPS", None)
    proc = subprocess.run([sys.executable, str(root / "tests" / "sglang_probe.py"), str(work)], env=env,
                          capture_output=True, text=True, timeout=300)
    out = work / "probe.json"
    assert out.is_file(), f"probe crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())
