"""Engine mechanics on a tiny random Llama: lossless verification, KV rollback, stops, drafter contract."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from adaspec.core.drafters.none import NoneDrafter
from adaspec.core.drafters.prompt_lookup import PromptLookupDrafter
from adaspec.core.engine.engine import RequestSpec, SpecEngine
from adaspec.core.step import FixedPolicy
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.errors import RequestError
from drafters_for_tests import NoisyOracleDrafter, RecordingDrafter

VOCAB = 97


def random_prompts(n: int, seed: int = 1, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    # Repeated motifs give prompt-lookup something to match.
    out = []
    for _ in range(n):
        motif = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 6))]
        body = [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]
        out.append([1] + motif + body + motif)
    return out


def hf_greedy(target, prompt: list[int], n: int) -> list[int]:
    """Independent oracle: transformers' own greedy generate, one prompt at a time, EOS disabled."""
    out = target.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def no_eos_target(tiny_target):
    return dataclasses.replace(tiny_target, eos_token_ids=frozenset())


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(10)


@pytest.fixture(scope="module")
def reference(no_eos_target, prompts):
    return {tuple(p): hf_greedy(no_eos_target, p, 40) for p in prompts}


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("drafter", ["none", "noisy-oracle", "prompt-lookup"])
def test_greedy_matches_hf_generate(no_eos_target, prompts, reference, batch_size, drafter):
    drafters = [NoneDrafter(), PromptLookupDrafter(1, 3), NoisyOracleDrafter(reference, VOCAB, seed=batch_size)]
    eng = SpecEngine(no_eos_target, drafters, batch_size=batch_size)
    res = eng.generate(prompts, SamplingParams(max_new_tokens=40), FixedPolicy(drafter, 5))
    for p, r in zip(prompts, res):
        assert r.output_tokens == reference[tuple(p)]
        assert r.finish_reason == "length"
    if drafter == "noisy-oracle":
        accepted = [rec.accepted for r in res for rec in r.records]
        assert min(accepted) == 0 and max(accepted) == 5, "every acceptance length should be exercised"
        assert sum(r.target_forwards for r in res) < sum(len(r.output_tokens) for r in res)


@pytest.mark.parametrize("ratio", [0.01, 1.0])
def test_kv_compaction_does_not_change_outputs(no_eos_target, prompts, reference, ratio):
    eng = SpecEngine(no_eos_target, [NoisyOracleDrafter(reference, VOCAB, seed=7)], batch_size=4,
                     compact_holes_ratio=ratio)
    res = eng.generate(prompts, SamplingParams(max_new_tokens=40), FixedPolicy("noisy-oracle", 6))
    assert [r.output_tokens for r in res] == [reference[tuple(p)] for p in prompts]


def test_records_account_for_every_token(no_eos_target, prompts, reference):
    eng = SpecEngine(no_eos_target, [NoisyOracleDrafter(reference, VOCAB, seed=3)], batch_size=4)
    res = eng.generate(prompts, SamplingParams(max_new_tokens=40), FixedPolicy("noisy-oracle", 4))
    for r in res:
        assert sum(rec.emitted for rec in r.records) == len(r.output_tokens)
        assert r.target_forwards == len(r.records)
        assert r.records[0].prefill and not any(rec.prefill for rec in r.records[1:])
        for rec in r.records:
            assert 0 <= rec.accepted <= rec.drafted <= rec.k and rec.emitted <= rec.accepted + 1
        assert r.tau == pytest.approx(len(r.output_tokens) / r.target_forwards)


def test_stops_at_eos_inside_an_accepted_draft(no_eos_target, prompts, reference):
    p = prompts[0]
    ref = reference[tuple(p)]
    eos = ref[7]
    first = ref.index(eos)  # the first occurrence is where plain decoding stops
    target = dataclasses.replace(no_eos_target, eos_token_ids=frozenset({eos}))
    eng = SpecEngine(target, [NoisyOracleDrafter({tuple(p): ref}, VOCAB, seed=0)], batch_size=1)
    (r,) = eng.generate([p], SamplingParams(max_new_tokens=40), FixedPolicy("noisy-oracle", 8))
    assert r.output_tokens == ref[: first + 1] and r.finish_reason == "stop"


def test_never_overshoots_max_new_tokens(no_eos_target, prompts, reference):
    eng = SpecEngine(no_eos_target, [NoisyOracleDrafter(reference, VOCAB, seed=1)], batch_size=4)
    for n in (1, 2, 5, 13):
        res = eng.generate(prompts[:4], SamplingParams(max_new_tokens=n), FixedPolicy("noisy-oracle", 8))
        assert all(r.output_tokens == reference[tuple(p)][:n] for p, r in zip(prompts, res))


def test_context_window_is_respected():
    from tiny_models import make_tiny_target

    target = dataclasses.replace(make_tiny_target(context=48), eos_token_ids=frozenset())
    prompt = random_prompts(1, seed=5, lo=30, hi=30)[0][:40]
    eng = SpecEngine(target, [PromptLookupDrafter(1, 2)], batch_size=1)
    (r,) = eng.generate([prompt], SamplingParams(max_new_tokens=100), FixedPolicy("prompt-lookup", 6))
    assert r.finish_reason == "context"
    assert len(prompt) + len(r.output_tokens) == target.context_len


def test_bad_requests_are_clear_errors(tiny_target):
    eng = SpecEngine(tiny_target, [NoneDrafter()], batch_size=2)
    with pytest.raises(RequestError, match="empty prompt"):
        eng.generate([[]], SamplingParams(), FixedPolicy("none", 0))
    with pytest.raises(RequestError, match="context"):
        eng.generate([[5] * tiny_target.context_len], SamplingParams(), FixedPolicy("none", 0))
    with pytest.raises(RequestError, match="unknown drafter"):
        eng.generate([[1, 5, 6]], SamplingParams(max_new_tokens=4), FixedPolicy("nope", 3))


def test_drafter_contract_observe_and_finish(no_eos_target, prompts, reference):
    rec = RecordingDrafter(hidden_layers=(0, -1))
    eng = SpecEngine(no_eos_target, [rec, NoisyOracleDrafter(reference, VOCAB, seed=2)], batch_size=3)
    res = eng.generate([RequestSpec(p, f"r{i}") for i, p in enumerate(prompts)], SamplingParams(max_new_tokens=20),
                       FixedPolicy("noisy-oracle", 4))
    assert sorted(rec.started) == sorted(r.request_id for r in res)
    for p, r in zip(prompts, res):
        # Everything written to the KV cache, in order: the prompt, then every output token but the last.
        assert rec.kv_tokens[r.request_id] == p + r.output_tokens[:-1]
        assert rec.next_tokens[r.request_id][-1] == r.output_tokens[-1]
        assert rec.finished[r.request_id] == p + r.output_tokens
    assert rec.hidden_shapes and all(s[1:] == (2, 64) for s in rec.hidden_shapes)


def test_hidden_states_are_the_targets(no_eos_target):
    """The hidden state handed to drafters equals a fresh forward's hidden state at that position."""
    rec = RecordingDrafter(hidden_layers=(0,))
    captured = []
    orig = rec.observe

    def observe(obs):
        captured.extend(o.hidden for o in obs)
        orig(obs)

    rec.observe = observe
    p = random_prompts(1, seed=9)[0]
    eng = SpecEngine(no_eos_target, [rec], batch_size=1)
    (r,) = eng.generate([p], SamplingParams(max_new_tokens=6), FixedPolicy("none", 0))
    full = torch.tensor([p + r.output_tokens[:-1]])
    with torch.no_grad():
        hs = no_eos_target.model(full, output_hidden_states=True).hidden_states[1][0]
    got = torch.cat([h[:, 0] for h in captured])
    torch.testing.assert_close(got, hs, rtol=1e-4, atol=1e-4)


def test_each_drafter_gets_its_own_layers_in_its_order(no_eos_target):
    """Drafters asking for different layers each receive [n, len(own layers), d] in their own order."""
    a, b = RecordingDrafter(hidden_layers=(0,)), RecordingDrafter(hidden_layers=(-1, 0))
    b.name = "recorder-b"
    seen: dict[str, list] = {"recorder": [], "recorder-b": []}
    for d in (a, b):
        orig = d.observe
        d.observe = lambda obs, d=d, orig=orig: (seen[d.name].extend(o.hidden for o in obs), orig(obs))
    eng = SpecEngine(no_eos_target, [a, b], batch_size=2)
    eng.generate(random_prompts(2, seed=4), SamplingParams(max_new_tokens=5), FixedPolicy("none", 0))
    assert eng.hidden_layers == (-1, 0)
    for ha, hb in zip(seen["recorder"], seen["recorder-b"]):
        assert ha.shape[1] == 1 and hb.shape[1] == 2
        torch.testing.assert_close(ha[:, 0], hb[:, 1])
        assert not torch.allclose(hb[:, 0], hb[:, 1])


def test_policy_finish_hook_is_called_once_per_request(no_eos_target, prompts, reference):
    class Tracking(FixedPolicy):
        def __init__(self) -> None:
            super().__init__("noisy-oracle", 3)
            self.finished: list[str] = []

        def finish(self, request_id: str) -> None:
            self.finished.append(request_id)

    pol = Tracking()
    eng = SpecEngine(no_eos_target, [NoisyOracleDrafter(reference, VOCAB, seed=4)], batch_size=3)
    res = eng.generate(prompts, SamplingParams(max_new_tokens=9), pol)
    assert sorted(pol.finished) == sorted(r.request_id for r in res)


def test_step_profile_accounts_for_each_stage(no_eos_target, prompts):
    """The engine's per-stage profile: every decode step is counted, the stages a step runs are there (per
    drafter), they sum to about the measured step wall time, and each record carries the step's overhead."""
    engine = SpecEngine(no_eos_target, [PromptLookupDrafter()], batch_size=4)
    res = engine.generate(prompts[:6], SamplingParams(max_new_tokens=12), FixedPolicy("prompt-lookup", 3))
    prof = engine.profile.to_json()
    decode_steps = len({r.step for x in res for r in x.records if not r.prefill})
    assert prof["steps"] == decode_steps and prof["prefills"] >= 2
    ms = prof["ms_per_step"]
    for stage in ("plan", "draft:prompt-lookup", "forward", "accept", "commit", "observe:prompt-lookup",
                  "feedback", "kv_compact", "prefill"):
        assert stage in ms, stage
    decode_ms = sum(v for k, v in ms.items() if k != "prefill")
    assert 0.8 * prof["wall_ms_per_step"] <= decode_ms <= 1.05 * prof["wall_ms_per_step"]
    assert prof["fed_tokens_per_step"] >= prof["batch_per_step"] >= 1.0
    later = [r for x in res for r in x.records if not r.prefill and r.step > min(r.step for x in res for r in x.records) + 2]
    assert later and all(r.overhead_s > 0.0 for r in later)
