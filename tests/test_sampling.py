"""Exact speculative sampling: emitted tokens follow the target's own (temperature, top-p) distribution."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adaspec.kernels import dispatch
from adaspec.core.drafters.none import NoneDrafter
from adaspec.core.drafters.prompt_lookup import PromptLookupDrafter
from adaspec.core.engine.engine import RequestSpec, SpecEngine
from adaspec.core.step import FixedPolicy
from adaspec.core.engine.sampling import SamplingParams, target_probs
from drafters_for_tests import SampledQDrafter
from stats_helpers import ALPHA, goodness_of_fit, tv_bound

T, TOP_P = 1.3, 0.9


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = target_probs(logits, 1.0, 0.8)
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = target_probs(logits, 1.0, 0.81)
    assert (p > 0).sum() == 3
    assert target_probs(logits, 1.0, 1e-6)[0, 0] == 1.0  # the top token is always kept


def exact_first_two(target, prompt, temperature, top_p):
    """Exact p(t1) and the exact marginal p(t2) = sum_t1 p(t1) p(t2 | t1) under (temperature, top-p)."""
    with torch.no_grad():
        logits = target.model(torch.tensor([prompt])).logits[0, -1]
        p1 = target_probs(logits, temperature, top_p)
        support = p1.nonzero().flatten()
        batch = torch.tensor([prompt + [int(t)] for t in support])
        p2_given = target_probs(target.model(batch).logits[:, -1], temperature, top_p)
    p2 = (p1[support, None] * p2_given).sum(0)
    return p1, p2


def sample_first_two(target, drafter, prompt, n, k, seed=0):
    eng = SpecEngine(target, [NoneDrafter(), drafter], batch_size=n)
    res = eng.generate([prompt] * n, SamplingParams(max_new_tokens=k + 1, temperature=T, top_p=TOP_P, seed=seed),
                       FixedPolicy(drafter.name, k))
    return [r.output_tokens[0] for r in res], [r.output_tokens[1] for r in res], res


@pytest.fixture(scope="module")
def tiny(tiny_target):
    return dataclasses.replace(tiny_target, eos_token_ids=frozenset())


PROMPT = [1, 17, 23, 5, 17, 23, 5, 17]  # repeats, so prompt-lookup drafts at the prefill


@pytest.mark.parametrize("which", ["none", "prompt-lookup", "sampled-q"])
def test_tiny_model_first_two_tokens_are_exact(tiny, which):
    p1, p2 = exact_first_two(tiny, PROMPT, T, TOP_P)
    q = torch.full((tiny.vocab_size,), 0.2)
    q[p1.topk(5).indices] = 3.0  # a plausible but wrong draft distribution
    drafter = {"none": NoneDrafter(), "prompt-lookup": PromptLookupDrafter(1, 3),
               "sampled-q": SampledQDrafter(q, seed=11)}[which]
    n = 6000
    t1, t2, res = sample_first_two(tiny, drafter, PROMPT, n, k=2, seed=3)
    if which != "none":
        first = [r.records[0] for r in res]
        assert all(rec.drafted == 2 for rec in first), "the prefill must carry a 2-token draft"
        accepted = sum(rec.accepted for rec in first)
        assert 20 <= accepted <= 2 * n - 20, f"{accepted} accepted: both branches must be exercised"
    for samples, p in ((t1, p1), (t2, p2)):
        pvalue, tv = goodness_of_fit(samples, p)
        assert pvalue > ALPHA, f"chi-square p={pvalue:.2e}, TV={tv:.4f}"
        assert tv < tv_bound(p, n)


def test_goodness_of_fit_detects_a_biased_verifier(tiny, monkeypatch):
    """Negative control: accepting every draft unconditionally must be caught by the same test."""
    def accept_all(draft, lens, probs, q, u, ru):
        acc = lens.clone()
        nxt = probs[torch.arange(len(lens)), acc].argmax(-1)
        return acc, nxt, acc + 1

    monkeypatch.setattr(dispatch, "rejection_verify", accept_all)
    p1, _ = exact_first_two(tiny, PROMPT, T, TOP_P)
    q = torch.full((tiny.vocab_size,), 0.2)
    q[p1.topk(5).indices] = 3.0
    t1, _, _ = sample_first_two(tiny, SampledQDrafter(q, seed=11), PROMPT, 3000, k=2)
    pvalue, _ = goodness_of_fit(t1, p1)
    assert pvalue < ALPHA


def test_sampling_is_reproducible_and_batch_independent(tiny):
    q = torch.ones(tiny.vocab_size)
    a = sample_first_two(tiny, SampledQDrafter(q, seed=1), PROMPT, 8, k=2, seed=5)[2]
    eng = SpecEngine(tiny, [SampledQDrafter(q, seed=1)], batch_size=3)
    b = eng.generate([PROMPT] * 8, SamplingParams(max_new_tokens=3, temperature=T, top_p=TOP_P, seed=5),
                     FixedPolicy("sampled-q", 2))
    assert [r.output_tokens for r in a] == [r.output_tokens for r in b]


@pytest.mark.model
@pytest.mark.parametrize("which", ["none", "prompt-lookup", "sampled-q"])
def test_real_model_first_token_distribution(real_runtime, which):
    """SmolLM2, T=1.3, top-p 0.9: the first sampled token, verified against a draft at the prefill, ~ p.

    Error bound: an exact sampler fails the chi-square test with probability ALPHA = 1e-3 and exceeds the TV
    bound (mean + 4 sd) with probability < 1e-3; the seeds are fixed, so the outcome is deterministic.
    """
    target = real_runtime.target
    prompt = target.encode("red green blue red green", chat=False)  # 5 tokens: 1200 prefills, a repeat to draft from
    with torch.no_grad():
        logits = target.model(torch.tensor([prompt])).logits[0, -1]
    p1 = target_probs(logits, T, TOP_P)
    q = torch.full((target.vocab_size,), 1e-3)
    q[p1.topk(8).indices[::2]] = 1.0  # half of the likely tokens: often right, often wrong
    drafter = {"none": NoneDrafter(), "prompt-lookup": PromptLookupDrafter(1, 4),
               "sampled-q": SampledQDrafter(q, seed=2)}[which]
    n = 1200
    eng = SpecEngine(target, [NoneDrafter(), drafter], batch_size=200)
    res = eng.generate([prompt] * n, SamplingParams(max_new_tokens=2, temperature=T, top_p=TOP_P, seed=9),
                       FixedPolicy(drafter.name, 1))
    if which != "none":
        first = [r.records[0] for r in res]
        assert all(rec.drafted == 1 for rec in first), "the prefill must carry a draft"
        accepted = sum(rec.accepted for rec in first)
        assert 10 <= accepted <= n - 10, f"{accepted} accepted: both branches must be exercised"
    samples = [r.output_tokens[0] for r in res]
    pvalue, tv = goodness_of_fit(samples, p1)
    assert pvalue > ALPHA, f"chi-square p={pvalue:.2e}, TV={tv:.4f}"
    assert tv < tv_bound(p1, n)


def test_a_batch_mixing_greedy_and_sampled_requests_keeps_each_exact(tiny):
    """Each request samples under its own parameters: in one batch, the greedy rows are plain greedy token for
    token, and the sampled rows' first two tokens follow the exact (T, top-p) distribution (chi-square/TV, the
    bound as above). Negative control: the same rows under another temperature fail the test."""
    p1, p2 = exact_first_two(tiny, PROMPT, T, TOP_P)
    greedy = SamplingParams(max_new_tokens=6)
    plain = SpecEngine(tiny, [NoneDrafter()], batch_size=1).generate([PROMPT], greedy, FixedPolicy(None, 0))
    eng = SpecEngine(tiny, [PromptLookupDrafter(1, 3)], batch_size=64)
    session = eng.session(FixedPolicy("prompt-lookup", 2))
    n = 3000
    sampled = [session.add(RequestSpec(list(PROMPT), f"s{i}"), SamplingParams(3, T, TOP_P, seed=7), index=i)
               for i in range(n)]
    greedy_rows = [session.add(RequestSpec(list(PROMPT), f"g{i}"), greedy, index=n + i) for i in range(n // 10)]
    while session.step():
        pass
    assert all(st.output == plain[0].output_tokens for st in greedy_rows)
    assert sum(rec.accepted for st in sampled for rec in st.records) > 20  # drafts were accepted, and rejected
    for samples, p in (([st.output[0] for st in sampled], p1), ([st.output[1] for st in sampled], p2)):
        pvalue, tv = goodness_of_fit(samples, p)
        assert pvalue > ALPHA and tv < tv_bound(p, n), f"chi-square p={pvalue:.2e}, TV={tv:.4f}"
    hot, _ = exact_first_two(tiny, PROMPT, 2.0 * T, TOP_P)  # negative control: a different distribution
    assert goodness_of_fit([st.output[0] for st in sampled], hot)[0] < ALPHA
