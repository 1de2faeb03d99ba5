"""Acceptance of the drafters issue on the real model, measured by exact replay on greedy traces.

Greedy output does not depend on drafts, so tau on a recorded trace (the engine's own step loop, drafters
fed the recorded hidden states) is exactly the live tau -- test_drift checks that -- at a fraction of the
cost. Traces are cached under the test cache dir.
"""

from __future__ import annotations

import pytest
import torch

from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.drafters.registry import make_drafter
from adaspec.core.drift.replay_engine import TraceEngine
from adaspec.core.engine.engine import RequestSpec
from adaspec.core.step import FixedPolicy
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.drafters.eagle3 import resolve_static_head
from adaspec.core.heads.adaptive import AdaptiveFeatures, AdaptiveHead, distill_targets
from adaspec.core.heads.export_sglang import read_draft_vocab

pytestmark = pytest.mark.model

NEW_TOKENS = 128
#: Measured with the shipped head on the first 40 MT-bench prompts (what `adaspec bench tau -d mt_bench --drafter
#: static --limit 40` reports): 1.349; on the first 80: 1.310 (MODEL_CARD.md, docs/results-cpu.md).
STATIC_MT_BENCH_TAU = 1.30
#: The issue's goal. Measured, over the static head's draft vocabulary (as served): +32.4% (tau 1.005 -> 1.332)
#: after 24 passes of learn() over 2,000 code_edit tokens with the target's top-32 logits as labels, in 41 s; over
#: the full 49k vocabulary it took 14 passes (+33.0%, 1.003 -> 1.334) but 101-120 s (one-hot labels: +26.2%).
ADAPTIVE_GAIN = 0.30
ADAPTIVE_LR, ADAPTIVE_DECAY, ADAPTIVE_EPOCHS = 1e-3, 0.8, 24


def replay_tau(target, drafter, name, prompts, traces, k, new_tokens=NEW_TOKENS, batch_size=4):
    engine = TraceEngine(target, {name: drafter}, lambda *_: 0.0, batch_size)
    specs = [RequestSpec(list(p), f"q{i}") for i, p in enumerate(prompts)]
    engine.traces = {s.request_id: tr for s, tr in zip(specs, traces)}
    res = engine.generate(specs, SamplingParams(max_new_tokens=new_tokens), FixedPolicy(name, k))
    return sum(len(r.output_tokens) for r in res) / sum(r.target_forwards for r in res)


def test_static_head_tau_on_mt_bench(real_runtime, real_settings, real_traces):
    """40 MT-bench first turns, greedy, chain lookahead 6, 128 new tokens."""
    prompts, traces = real_traces.get("mt_bench", 40)
    tau = replay_tau(real_runtime.target, make_drafter("static", real_settings, real_runtime.target), "static",
                     prompts, traces, k=6, batch_size=16)  # greedy replay: tau does not depend on the batch
    print(f"static head tau on 40 MT-bench prompts (k=6): {tau:.3f}")
    assert tau >= STATIC_MT_BENCH_TAU


def test_adaptive_head_learns_a_domain(real_runtime, real_settings, real_traces):
    """learn() on 2,000 tokens of code_edit lifts tau on unseen code_edit prompts over the starting point.

    The labels are the target's own top-32 logits at each position (`distill_targets`: its LM head on the logged
    hidden state of the next position), which carry far more than the one token it emitted."""
    target = real_runtime.target
    train_p, train_t = real_traces.get("code_edit", 24)
    held_p, held_t = real_traces.get("code_edit", 12, offset=40)
    torch.manual_seed(0)
    head = AdaptiveHead.for_target(target, inner_size=1024, seed=0, lr=ADAPTIVE_LR, step_decay=ADAPTIVE_DECAY)
    # as served (`adaptive_draft_vocab`): it drafts, and so learns, over the static head's draft vocabulary
    head.set_draft_vocab(read_draft_vocab(resolve_static_head(real_settings.static_head_path, real_settings.cache_dir,
                                                              real_settings.model)))
    drafter = AdaptiveDrafter(head, collect=1_000_000, unroll=3)
    before = replay_tau(target, drafter, "adaptive", held_p, held_t, k=4, batch_size=12)
    drafter.take_experience()  # nothing from the held-out prompts is trained on
    streams: list = []
    drafter.on_experience = lambda rid, f, y: streams.append(
        (f, y, distill_targets(f.hidden, y, head.lm_head_weight, topk=32)))
    replay_tau(target, drafter, "adaptive", train_p, train_t, k=4)
    n = 2000
    hidden = torch.cat([f.hidden for f, _, _ in streams])
    assert len(hidden) >= n
    tokens = torch.cat([f.tokens for f, _, _ in streams])[:n]
    targets = torch.cat([y for _, y, _ in streams])[:n]
    ids = torch.cat([s[0] for _, _, s in streams])[:n]
    logits = torch.cat([s[1] for _, _, s in streams])[:n]
    hidden = hidden[:n]
    gen = torch.Generator().manual_seed(0)
    for _ in range(ADAPTIVE_EPOCHS):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]
            head.learn(AdaptiveFeatures(hidden[idx], tokens[idx]), targets[idx], (ids[idx], logits[idx]))
    after = replay_tau(target, drafter, "adaptive", held_p, held_t, k=4, batch_size=12)
    gain = after / before - 1.0
    print(f"adaptive head on unseen code_edit: tau {before:.3f} -> {after:.3f} ({gain:+.1%})")
    assert gain >= ADAPTIVE_GAIN
