"""Acceptance: on the real model, every drafter's greedy output is token-for-token plain greedy decoding.

16 MT-bench + 16 HumanEval prompts (chat template), 128 new tokens. "Plain decoding" is the target's own
greedy answer recorded once per test run by the engine with no drafting (`real_traces`), itself checked
against transformers (each token the argmax of its forward; its `generate` on two prompts), so the oracle does
not rest on our engine alone. One
engine pass per batch size checks every drafter: request i drafts with drafter (i + step) mod n each step,
so every drafter drafts for every prompt -- from fresh state, after steps of the others, and with a switch at
every step -- and each one's drafts are verified against the same plain output.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from adaspec.core.drafters.registry import available
from adaspec.core.engine.engine import RequestSpec
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.step import Plan, PolicyBase

pytestmark = pytest.mark.model

NEW_TOKENS = 128
LOOKAHEAD = 6
#: Logit gap below which two tokens tie up to float32 noise between transformers' full forward and the engine's
#: incremental (KV-cached, batched) one.
NEAR_TIE = 1e-3
DRAFTERS = [d for d in available() if d != "none"]


class Rotation(PolicyBase):
    """Request i drafts with names[(i + step) % len(names)] at a fixed lookahead ("none": plain decoding)."""

    def __init__(self, names: list[str], k: int) -> None:
        self.names, self.k, self.step = names, k, 0

    def plan(self, requests):
        self.step += 1
        out = []
        for st in requests:
            name = self.names[(int(st.request_id.split("-")[1]) + self.step) % len(self.names)]
            out.append(Plan(None, 0) if name == "none" else Plan(name, self.k))
        return out


@pytest.fixture(scope="module")
def prompts_and_plain(real_traces):
    mt, mt_traces = real_traces.get("mt_bench", 16)
    he, he_traces = real_traces.get("humaneval", 16)
    return mt + he, [tr.output for tr in mt_traces + he_traces]


def test_plain_decoding_is_transformers_greedy(real_runtime, prompts_and_plain):
    """Every plain token is the argmax of transformers' own forward over the prefix (teacher forcing, all 32
    prompts, one forward each; a gap under NEAR_TIE logits is float noise between two paths, counted and
    bounded), and transformers' `generate` reproduces two of the answers token for token."""
    prompts, plain = prompts_and_plain
    model = real_runtime.target.model
    near_ties = 0
    for i, (p, out) in enumerate(zip(prompts, plain)):
        with torch.inference_mode():
            logits = model(torch.tensor([p + out[:-1]])).logits[0, len(p) - 1:]  # [len(out), V]
        chosen = logits.gather(1, torch.tensor(out).unsqueeze(1))[:, 0]
        gap = logits.max(dim=1).values - chosen  # 0 where the plain token is the argmax
        assert float(gap.max()) < NEAR_TIE, f"prompt {i}: token {int(gap.argmax())} is {float(gap.max()):.2e} below the max"
        near_ties += int((gap > 0).sum())
    print(f"plain decoding vs transformers' forward: {sum(map(len, plain))} tokens, {near_ties} near-ties")
    assert near_ties <= 2, f"{near_ties} near-ties: the engine's plain decoding drifts from transformers'"
    eos = sorted(real_runtime.target.eos_token_ids)
    for i in (0, 16):  # one chat, one code prompt through transformers' generate itself
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompts[i]]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos[0])
        assert out[0, len(prompts[i]):].tolist() == plain[i], f"prompt {i}"


@pytest.mark.parametrize("batch_size,every", [(4, 1), (1, 4)])  # batch 1: every 4th prompt (4 chat + 4 code)
def test_every_drafter_is_lossless(real_runtime, prompts_and_plain, batch_size, every):
    prompts, plain = prompts_and_plain
    idx = list(range(0, len(prompts), every))
    rt = real_runtime
    rt.reset_drafters()  # fresh drafter state: nothing learnt from another test's requests
    rt.engine.batch_size = batch_size
    specs = [RequestSpec(list(prompts[i]), f"q-{i}") for i in idx]
    res = rt.engine.generate(specs, SamplingParams(max_new_tokens=NEW_TOKENS), Rotation(DRAFTERS, LOOKAHEAD))
    diverged = [i for i, r in zip(idx, res) if r.output_tokens != plain[i]]
    assert not diverged, f"batch {batch_size}: diverged from plain greedy on prompts {diverged}"
    drafted, accepted = Counter(), Counter()
    for r in res:
        for rec in r.records:
            if rec.drafter:
                drafted[rec.drafter] += rec.drafted
                accepted[rec.drafter] += rec.accepted
    for d in DRAFTERS:
        assert drafted[d] > 0 and accepted[d] > 0, f"{d} at batch {batch_size} never had a draft accepted"
    print(f"batch {batch_size}: accepted/drafted per drafter", {d: f"{accepted[d]}/{drafted[d]}" for d in DRAFTERS})
