"""Ragged verify: packed chunks give the padded engine's tokens, acceptances and hidden states."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adaspec.core.engine import ragged
from adaspec.core.engine.engine import SpecEngine
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.step import FixedPolicy, forward_tokens
from drafters_for_tests import NoisyOracleDrafter, RecordingDrafter, SampledQDrafter
from test_engine_mechanics import VOCAB, hf_greedy, random_prompts
from tiny_models import make_tiny_target


@pytest.fixture(scope="module")
def target():
    return dataclasses.replace(make_tiny_target(seed=3), eos_token_ids=frozenset())


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(9, seed=11)  # lengths 8..52: prefill is ragged too


@pytest.fixture(scope="module")
def reference(target, prompts):
    return {tuple(p): hf_greedy(target, p, 30) for p in prompts}


def _run(target, drafters, prompts, params, policy, ragged_verify, batch_size, monkeypatch):
    packed = []
    build = ragged.RaggedChunk.build
    monkeypatch.setattr(ragged.RaggedChunk, "build",
                        classmethod(lambda cls, *a: packed.append(1) or build(*a)))
    rec = RecordingDrafter(hidden_layers=(0, -1))
    hidden: list[torch.Tensor] = []
    orig = rec.observe
    rec.observe = lambda obs: (hidden.extend(o.hidden for o in obs), orig(obs))
    eng = SpecEngine(target, [*drafters, rec], batch_size=batch_size, ragged_verify=ragged_verify)
    res = eng.generate(prompts, params, policy)
    return eng, res, hidden, len(packed)


@pytest.mark.parametrize("lens", [[1, 2, 2, 2], [1, 2, 2, 2, 2], [3, 1, 1], [5, 1, 1, 1], [2, 2, 1]])
def test_the_packed_row_is_filled_to_a_multiple_in_padding_slots(lens):
    """Real tokens first, row after row; fillers round the length up to PACK_MULTIPLE, each in a padding slot
    of its row (one column more when there are too few), and no real query attends to one."""
    lens_t = torch.tensor(lens)
    chunk = ragged.RaggedChunk.build(lens_t, torch.ones(len(lens), 3, dtype=torch.bool), cache=None)
    T = sum(lens)
    assert chunk.real == T and (T + chunk.fillers) % ragged.PACK_MULTIPLE == 0 and chunk.fillers < 4
    assert forward_tokens(lens, False, ragged.PACK_MULTIPLE, spec=True) == T + chunk.fillers  # what costs count
    expect = [(i, j) for i, n in enumerate(lens) for j in range(n)]
    assert list(zip(chunk.rows[:T].tolist(), chunk.offs[:T].tolist())) == expect
    fill = list(zip(chunk.rows[T:].tolist(), chunk.offs[T:].tolist()))
    assert all(j >= lens[i] and j < chunk.width for i, j in fill) and len(set(fill)) == len(fill)
    for i, j in expect:  # a real query sees its row's cache and its own chunk up to itself, nothing else
        row = chunk.mask[i, 0, j].tolist()
        assert row[:3] == [True] * 3 and row[3:] == [c <= j for c in range(chunk.width)]


@pytest.mark.parametrize("batch_size", [3, 5, 8])
def test_packed_steps_match_padded_ones(target, prompts, reference, batch_size, monkeypatch):
    """Random chains of every length 0..6 per row: the ragged engine packs its mixed steps (and the prefill
    of prompts of different lengths), and emits, accepts and observes exactly what the padded engine does."""
    params, policy = SamplingParams(max_new_tokens=30), FixedPolicy("noisy-oracle", 6)
    runs = {}
    for mode in (True, False):
        runs[mode] = _run(target, [NoisyOracleDrafter(reference, VOCAB, seed=batch_size)], prompts, params,
                          policy, mode, batch_size, monkeypatch)
    (eng_r, res_r, hid_r, packed_r), (eng_p, res_p, hid_p, packed_p) = runs[True], runs[False]
    assert eng_r.ragged_verify and not eng_r.padded_verify and eng_p.padded_verify
    assert packed_p == 0 and packed_r > 0.5 * sum(len(r.records) for r in res_r) / batch_size
    for p, a, b in zip(prompts, res_r, res_p):
        assert a.output_tokens == b.output_tokens == reference[tuple(p)]
        assert [(r.drafted, r.accepted) for r in a.records] == [(r.drafted, r.accepted) for r in b.records]
    accepted = [r.accepted for g in res_r for r in g.records]
    assert min(accepted) == 0 and max(accepted) == 6
    assert len(hid_r) == len(hid_p)
    for x, y in zip(hid_r, hid_p):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_packed_sampling_matches_padded_sampling(target, prompts, monkeypatch):
    """Rejection sampling with full draft distributions: the same seeds give the same tokens packed or padded
    (each row's logits are the same numbers, only laid out differently)."""
    q = torch.rand(VOCAB, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=5)
    outs = []
    for mode in (True, False):
        _, res, _, packed = _run(target, [SampledQDrafter(q, seed=1)], prompts[:5], params,
                                 FixedPolicy("sampled-q", 3), mode, 3, monkeypatch)
        outs.append([r.output_tokens for r in res])
        assert (packed > 0) == mode
    assert outs[0] == outs[1]


def test_attention_other_than_sdpa_stays_padded(prompts):
    """The packed path needs the SDPA attention interface; an eager model is verified padded, still exact."""
    eager = dataclasses.replace(make_tiny_target(seed=4), eos_token_ids=frozenset())
    eager.model.config._attn_implementation = "eager"
    eng = SpecEngine(eager, [], batch_size=3)
    assert not eng.ragged_verify and eng.padded_verify
    assert eager.model.config._attn_implementation == "eager"
    res = eng.generate(prompts[:3], SamplingParams(max_new_tokens=8), FixedPolicy(None, 0))
    assert [r.output_tokens for r in res] == [hf_greedy(eager, p, 8) for p in prompts[:3]]


def test_the_model_outside_the_engine_is_plain_sdpa(target, prompts):
    """Once an engine routes the model through the ragged attention, other callers (training, `bench tau`)
    get plain SDPA: the same logits as before."""
    fresh = make_tiny_target(seed=3)
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        before = fresh.model(x).logits
        SpecEngine(fresh, [], batch_size=1)
        assert fresh.model.config._attn_implementation == ragged.ATTENTION
        after = fresh.model(x).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
