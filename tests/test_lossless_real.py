"""Acceptance: on the real model, every drafter's greedy output is token-for-token plain greedy decoding.

16 MT-bench + 16 HumanEval prompts (chat template), 128 new tokens, batch sizes 1 and 4. "Plain decoding"
is the engine with the `none` drafter at batch size 1 (one token per forward, no speculation), itself
checked against transformers' own `generate` on a subset, so the oracle does not rest on our engine alone.
"""

from __future__ import annotations

import pytest
import torch

from adaspec.core.datasets import load_prompts
from adaspec.core.drafters.registry import available
from adaspec.core.step import FixedPolicy
from adaspec.core.engine.sampling import SamplingParams

pytestmark = pytest.mark.model

NEW_TOKENS = 128
LOOKAHEAD = 6


@pytest.fixture(scope="module")
def prompts(real_runtime, data_dir):
    rows = load_prompts(data_dir / "mt_bench.jsonl", 16) + load_prompts(data_dir / "humaneval.jsonl", 16)
    return [real_runtime.target.encode(r.prompt) for r in rows]


def run(rt, prompts, drafter, batch_size):
    rt.engine.batch_size = batch_size
    return rt.engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), FixedPolicy(drafter, LOOKAHEAD))


@pytest.fixture(scope="module")
def plain(real_runtime, prompts):
    return [r.output_tokens for r in run(real_runtime, prompts, "none", 1)]


def test_plain_engine_matches_transformers_generate(real_runtime, prompts, plain):
    model = real_runtime.target.model
    eos = sorted(real_runtime.target.eos_token_ids)
    for i in range(0, len(prompts), 4):  # 8 prompts: 4 chat + 4 code
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompts[i]]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos[0])
        assert out[0, len(prompts[i]):].tolist() == plain[i], f"prompt {i}"


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("drafter", [d for d in available()])
def test_drafter_is_lossless(real_runtime, prompts, plain, drafter, batch_size):
    if drafter == "none" and batch_size == 1:
        pytest.skip("this is the reference itself")
    res = run(real_runtime, prompts, drafter, batch_size)
    diverged = [i for i, (r, p) in enumerate(zip(res, plain)) if r.output_tokens != p]
    assert not diverged, f"{drafter} at batch {batch_size} diverged on prompts {diverged}"
    if drafter != "none":
        forwards = sum(r.target_forwards for r in res)
        tokens = sum(len(r.output_tokens) for r in res)
        assert forwards < tokens, f"{drafter} never accepted a draft"
