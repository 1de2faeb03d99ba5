"""Static EAGLE-3 head, adaptive head, their drafters, SGLang export and the static trainer (tiny models)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from tiny_models import make_tiny_target
from transformers import LlamaConfig, LlamaForCausalLM

from adaspec.core.drafters.adaptive import AdaptiveDrafter
from adaspec.core.drafters.eagle3 import Eagle3Drafter
from adaspec.core.drafters.none import NoneDrafter
from adaspec.core.engine.engine import SpecEngine
from adaspec.core.step import FixedPolicy, Plan, PolicyBase
from adaspec.core.engine.sampling import SamplingParams
from adaspec.core.heads import sglang_eagle3_format as fmt
from adaspec.core.heads.adaptive import (
    IGNORE,
    AdaptiveHead,
    distill_targets,
    features_from_stream,
    load_adaptive,
    save_adaptive,
)
from adaspec.core.heads.eagle3 import Eagle3Head
from adaspec.core.heads.export_sglang import CONFIG_FILE, check_export, export_sglang, load_sglang
from adaspec.core.target import Target
from adaspec.core.heads.train_static import DistillData, StaticTrainArgs, StaticTrainer, train_static

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def prompts_for(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 16))] for _ in range(n)]


@pytest.fixture(scope="module")
def target() -> Target:
    # 8 layers: SGLang's default EAGLE-3 layers (1, L//2-1, L-4) = (1, 3, 4) are distinct
    return dataclasses.replace(make_tiny_target(layers=8), eos_token_ids=frozenset())


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """A static head trained a few steps on the tiny target's own answers (so drafts do get accepted)."""
    d = tmp_path_factory.mktemp("trained")
    args = StaticTrainArgs(out_dir=d / "out", cache_dir=d / "cache", max_new_tokens=24, max_steps=40,
                           batch_seqs=4, ttt_steps=3, lr=3e-3, warmup_steps=5, show_progress=False,
                           save_every=1000, eval_prompts=0)
    final = train_static(args, target, prompt_ids=prompts_for(8, seed=11))
    return load_sglang(final, target)


def test_default_layers_follow_sglang():
    # llama.py L892 captures the INPUTS of layers [2, L//2, L-3] = outputs of [1, L//2-1, L-4]
    assert fmt.default_aux_layers(30) == (1, 14, 26)
    assert fmt.default_aux_layers(32) == (1, 15, 28)
    with pytest.raises(ValueError):
        fmt.default_aux_layers(4)


def test_head_shapes_and_names(target):
    head = Eagle3Head.for_target(target)
    c = head.cfg
    assert c.aux_layers == (1, 3, 4)
    expected = fmt.tensor_shapes(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == expected  # no embedding / LM head
    B, T, S = 2, 5, 3
    tokens = torch.randint(0, VOCAB, (B, T))
    aux = torch.randn(B, T, 3 * c.hidden_size)
    past = torch.randn(2, B, c.num_kv_heads, S, c.head_dim)
    pre, k, v = head.extend(tokens, head.fuse(aux), torch.arange(S, S + T).expand(B, T), past[0], past[1],
                            torch.ones(B, S, dtype=torch.bool), torch.ones(B, T, dtype=torch.bool))
    assert pre.shape == (B, T, c.hidden_size) and k.shape == v.shape == (B, c.num_kv_heads, T, c.head_dim)
    outs = head.ttt_forward(torch.randint(0, VOCAB, (B, T + 2)), aux, torch.ones(B, T, dtype=torch.bool), 3)
    assert len(outs) == 3 and all(o.shape == (B, T, c.hidden_size) for o in outs)
    adaptive = AdaptiveHead.for_target(target, inner_size=32)
    g = adaptive.step(torch.randn(4, c.hidden_size), torch.randint(0, VOCAB, (4,)))
    assert g.shape == (4, c.hidden_size)
    ids, probs = adaptive.draft(torch.randn(4, c.hidden_size), torch.randint(0, VOCAB, (4,)), 3)
    assert ids.shape == probs.shape == (4, 3) and bool(((probs > 0) & (probs <= 1)).all())


def test_ttt_unroll_equals_incremental_drafting(target):
    """Training-time test sees exactly what chain drafting computes: same numbers, position by position."""
    torch.manual_seed(0)
    head = Eagle3Head.for_target(target, seed=3).eval()
    c, T, steps = head.cfg, 7, 3
    tokens = torch.randint(0, VOCAB, (1, T + steps - 1))
    aux = torch.randn(1, T, 3 * c.hidden_size)
    with torch.no_grad():
        outs = head.ttt_forward(tokens, aux, torch.ones(1, T, dtype=torch.bool), steps)
        t = 3  # chain rooted at position t: commit pairs 0..t, then draft with the true tokens
        empty = torch.zeros(1, c.num_kv_heads, 0, c.head_dim)
        none, first = torch.zeros(1, 0, dtype=torch.bool), torch.ones(1, t + 1, dtype=torch.bool)
        pre, k, v = head.extend(tokens[:, : t + 1], head.fuse(aux[:, : t + 1]), torch.arange(t + 1)[None],
                                empty, empty, none, first)
        torch.testing.assert_close(head.logits_hidden(pre[:, t]), outs[0][:, t])
        g, pk, pv = pre[:, t : t + 1], k, v
        for i in range(1, steps):
            one = torch.ones(1, 1, dtype=torch.bool)
            g, k1, v1 = head.extend(tokens[:, t + i : t + i + 1], g, torch.tensor([[t + i]]), pk, pv,
                                    torch.ones(1, pk.shape[2], dtype=torch.bool), one)
            pk, pv = torch.cat([pk, k1], 2), torch.cat([pv, v1], 2)
            torch.testing.assert_close(head.logits_hidden(g[:, 0]), outs[i][:, t], rtol=1e-4, atol=1e-5)


class Alternate(PolicyBase):
    """Policy alternating the static and adaptive drafters (both in one engine) with varying k."""

    def __init__(self) -> None:
        self.n = 0

    def plan(self, requests):
        self.n += 1
        return [Plan("static" if (self.n + i) % 2 else "adaptive", 1 + (self.n + i) % 4)
                for i in range(len(requests))]

    def feedback(self, records) -> None:
        return None


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("drafter", ["static", "adaptive", "both"])
def test_drafting_is_lossless(target, trained, batch_size, drafter):
    prompts = prompts_for(4, seed=5)
    params = SamplingParams(max_new_tokens=24)
    ref = SpecEngine(target, [NoneDrafter()], batch_size=batch_size).generate(prompts, params, FixedPolicy("none", 0))
    static, adaptive = Eagle3Drafter(trained), AdaptiveDrafter(AdaptiveHead.for_target(target, inner_size=32))
    drafters = {"static": [static], "adaptive": [adaptive], "both": [static, adaptive]}[drafter]
    engine = SpecEngine(target, drafters, batch_size=batch_size)
    policy = Alternate() if drafter == "both" else FixedPolicy(drafter, 4)
    res = engine.generate(prompts, params, policy)
    assert [r.output_tokens for r in res] == [r.output_tokens for r in ref]
    recs = [x for r in res for x in r.records if x.drafted]
    assert recs and all(0.0 <= c <= 1.0 for x in recs for c in x.confidence)
    assert sum(x.accepted for x in recs) > 0  # drafts do get accepted: the accept path is exercised
    assert not static.states and not adaptive.states  # finish() dropped per-request state


def _chaotic_target() -> Target:
    """A tiny Llama with large random weights: its greedy answers are far from `repeat the last token`."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.3)
    return Target(LlamaForCausalLM(cfg).eval(), None, torch.device("cpu"), torch.float32, frozenset(), 256, "chaotic")


def test_adaptive_learn_raises_acceptance_on_held_out_stream():
    """A repetitive workload (4 recurring prompt templates): learning from its first part lifts acceptance
    on later, unseen requests of the same stream."""
    tgt = _chaotic_target()
    rng = random.Random(0)
    templates = [[1] + [rng.randrange(3, VOCAB) for _ in range(8)] for _ in range(4)]
    stream = [templates[rng.randrange(4)] for _ in range(24)]
    train, held_out = stream[:16], stream[16:]
    head = AdaptiveHead.for_target(tgt, inner_size=256, lr=3e-3, seed=0)
    drafter = AdaptiveDrafter(head, collect=100_000, unroll=3)
    engine = SpecEngine(tgt, [drafter], batch_size=4)
    params = SamplingParams(max_new_tokens=24)

    def acceptance(prompts):
        res = engine.generate(prompts, params, FixedPolicy("adaptive", 3))
        recs = [x for r in res for x in r.records if x.drafted]
        return sum(x.accepted for x in recs) / sum(x.drafted for x in recs)

    before = acceptance(held_out)
    drafter.take_experience()  # held-out experience is never trained on
    acceptance(train)
    feats, targets = drafter.take_experience()
    assert len(feats) == targets.shape[0] > 300
    first = head.learn(feats, targets)
    for _ in range(40):
        last = head.learn(feats, targets)
    assert set(first) >= {"loss", "tokens"} and last["loss"] < first["loss"]
    after = acceptance(held_out)
    assert before < 0.1 and after > 0.8, (before, after)


def test_features_from_stream_alignment():
    hidden = torch.arange(5, dtype=torch.float32)[:, None].expand(5, 2)
    feats, tgt = features_from_stream(hidden, [10, 11, 12, 13, 14, 15], unroll=2, first=1)
    assert feats.hidden[:, 0].tolist() == [1, 2, 3]
    assert feats.tokens.tolist() == [12, 13, 14]
    assert tgt.tolist() == [[13, 14], [14, 15], [15, -100]]


def test_distill_targets_are_the_lm_head_of_the_next_rows():
    """Soft label of sample t, unroll step j = the LM head on row t+1+j; past the stream's rows, the hard target."""
    torch.manual_seed(0)
    T, d, V, U = 7, 8, 20, 3
    lm_head = torch.randn(V, d)
    hidden = torch.randn(T, d)
    greedy = (hidden @ lm_head.T).argmax(-1)  # row r's argmax is "the token at r + 1"
    tokens = torch.cat([torch.tensor([5]), greedy])  # a greedy stream: token r+1 = argmax of row r
    feats, targets = features_from_stream(hidden, tokens, unroll=U)
    ids, logits = distill_targets(hidden, targets, lm_head, topk=4)
    assert ids.shape == logits.shape == (T - 1, U, 4)
    for t in range(T - 1):
        for j in range(U):
            if targets[t, j] == IGNORE:
                continue
            assert ids[t, j, 0] == targets[t, j]  # on a greedy stream the top soft label is the hard one
            if t + 1 + j < T:
                top = (hidden[t + 1 + j] @ lm_head.T).topk(4)
                assert torch.equal(ids[t, j], top.indices) and torch.allclose(logits[t, j], top.values)
            else:
                assert logits[t, j, 1:].max() < -1e3  # one-hot on the hard target
    _, late = features_from_stream(hidden, tokens, unroll=U, first=2)  # sample i is row first + i
    late_ids, _ = distill_targets(hidden, late, lm_head, topk=4, first=2)
    assert torch.equal(late_ids, ids[2:])


def test_state_dict_round_trip(target):
    a = AdaptiveHead.for_target(target, inner_size=32, seed=1)
    torch.nn.init.normal_(a.down.weight, std=0.1)
    sd = a.state_dict()
    assert set(sd) == {"hidden_norm.weight", "embed_norm.weight", "up.weight", "down.weight"}
    b = AdaptiveHead.for_target(target, inner_size=32, seed=2)
    b.load_state_dict(sd)
    h, tok = torch.randn(5, 64), torch.randint(0, VOCAB, (5,))
    assert torch.equal(a.draft(h, tok, 3)[0], b.draft(h, tok, 3)[0])
    s1, s2 = Eagle3Head.for_target(target, seed=1), Eagle3Head.for_target(target, seed=2)
    assert not torch.equal(s1.fc.weight, s2.fc.weight)
    s2.load_state_dict(s1.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(s1.state_dict().values(), s2.state_dict().values()))


def test_adaptive_file_round_trip_reads_width_from_file(target, tmp_path):
    a = AdaptiveHead.for_target(target, inner_size=48, seed=1, lr=5e-4)
    torch.nn.init.normal_(a.down.weight, std=0.1)
    path = save_adaptive(a, tmp_path / "head.safetensors")
    b = load_adaptive(path, target)
    assert b.cfg.inner_size == 48 and b.cfg.lr == 5e-4
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        load_adaptive(tmp_path / "missing.safetensors", target)


@pytest.mark.parametrize("reduced", [False, True])
def test_export_matches_sglang_format_and_loads_back(target, trained, tmp_path, reduced):
    head = trained
    if reduced:  # a draft vocabulary of 60 target ids: lm_head + d2t/t2d appear, as SGLang expects
        cfg = dataclasses.replace(trained.cfg, draft_vocab=tuple(range(3, 63)))
        m = target.model
        head = Eagle3Head(cfg, m.get_input_embeddings().weight, m.get_output_embeddings().weight)
        head.load_state_dict(trained.state_dict())
    out = export_sglang(head, tmp_path / "draft")
    assert check_export(out) == []
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert set(fmt.CONFIG_KEYS) <= set(cfg)
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert cfg["draft_vocab_size"] == (60 if reduced else None)
    back = load_sglang(out, target)
    assert back.cfg == head.cfg
    prompts = prompts_for(3, seed=9)
    params = SamplingParams(max_new_tokens=16)

    def run(h):
        d = Eagle3Drafter(h)
        res = SpecEngine(target, [d], batch_size=3).generate(prompts, params, FixedPolicy("static", 3))
        return [r.output_tokens for r in res], [x.confidence for r in res for x in r.records]

    assert run(back) == run(head)


def test_trainer_resumes_bit_identically(target, tmp_path):
    prompts = prompts_for(6, seed=21)
    common = dict(cache_dir=tmp_path / "cache", max_new_tokens=12, batch_seqs=2, ttt_steps=2, warmup_steps=1,
                  show_progress=False, eval_prompts=0, shard_size=4, save_every=1)
    straight = train_static(StaticTrainArgs(out_dir=tmp_path / "a", max_steps=3, **common), target, prompts)
    part = StaticTrainArgs(out_dir=tmp_path / "b", max_steps=3, **common)
    # stop after 2 steps (the checkpoint is saved every step), then resume to 3
    head = Eagle3Head.for_target(target, seed=part.seed)
    data_dir = next((tmp_path / "cache" / "distill").iterdir())
    trainer = StaticTrainer(head, DistillData(data_dir), part)
    trainer.run(until=2, ckpt_dir=tmp_path / "b" / "checkpoint")
    loaded = StaticTrainer.load(tmp_path / "b" / "checkpoint", target, DistillData(data_dir), part)
    assert loaded.state.step == 2 and loaded.state.losses == trainer.state.losses
    for (n1, p1), (n2, p2) in zip(trainer.head.state_dict().items(), loaded.head.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    o1, o2 = trainer.opt.state_dict()["state"], loaded.opt.state_dict()["state"]
    assert o1.keys() == o2.keys()
    assert all(torch.equal(o1[p][k], o2[p][k]) for p in o1 for k in o1[p])
    resumed = train_static(part, target, prompts)  # picks up the step-2 checkpoint
    a, b = load_sglang(straight, target), load_sglang(resumed, target)
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p1, p2), n1
    meta = json.loads((tmp_path / "b" / "checkpoint" / "trainer.json").read_text())
    assert meta["state"]["step"] == 3


def test_aux_scale_is_folded_into_fc_on_export(target, tmp_path):
    """Training may scale target features per dim; the exported head (plain SGLang `fc`) computes the same."""
    head = Eagle3Head.for_target(target, seed=3)
    head.aux_scale.copy_(torch.rand_like(head.aux_scale) * 10 + 0.01)
    back = load_sglang(export_sglang(head, tmp_path / "h"), target)
    assert torch.equal(back.aux_scale, torch.ones_like(back.aux_scale))
    aux = torch.randn(2, 5, head.fc.in_features) * 50
    assert torch.allclose(back.fuse(aux), head.fuse(aux), rtol=1e-4, atol=1e-3)
    assert check_export(tmp_path / "h") == []


class _EveryThird(PolicyBase):
    """static on every third step only (the rest: no draft), so backlogs of several steps build up."""

    def __init__(self) -> None:
        self.n = 0

    def plan(self, requests):
        self.n += 1
        return [Plan("static", 3) if self.n % 3 == 0 else Plan(None, 0) for _ in requests]


def test_static_backlog_drafts_what_an_eager_cache_drafts(target, trained):
    """The static head folds committed positions into its cache lazily (one batched pass at the next propose):
    the drafts, confidences and outputs equal those of a head that extends its cache on every observe
    (max_backlog=0), and steps without a static draft run no head pass at all."""
    prompts = prompts_for(3, seed=13)
    params = SamplingParams(max_new_tokens=20)

    def run(max_backlog: int):
        d = Eagle3Drafter(trained, max_backlog=max_backlog)
        in_observe, passes = [False], []
        extend, observe = d.head.extend, d.observe
        d.head.extend = lambda *a, **k: (passes.append(in_observe[0]), extend(*a, **k))[1]

        def timed_observe(obs):
            in_observe[0] = True
            observe(obs)
            in_observe[0] = False

        d.observe = timed_observe
        res = SpecEngine(target, [d], batch_size=3).generate(prompts, params, _EveryThird())
        drafts = [(x.draft_tokens, [round(c, 4) for c in x.confidence]) for r in res for x in r.records]
        return [r.output_tokens for r in res], drafts, sum(passes), len(passes)

    lazy_out, lazy_drafts, lazy_observe_passes, lazy_passes = run(256)
    eager_out, eager_drafts, eager_observe_passes, eager_passes = run(0)
    assert lazy_out == eager_out
    assert lazy_drafts == eager_drafts and any(t for t, _ in lazy_drafts)
    assert lazy_observe_passes == 0 and eager_observe_passes > 6  # eager: a head pass at every step
    assert lazy_passes < eager_passes


def test_adaptive_loss_over_a_draft_vocabulary_masks_what_it_cannot_draft():
    """With a draft vocabulary the loss is the cross-entropy over those ids only (what is served), a target
    outside it counts nowhere; without one it is the full-vocabulary cross-entropy (the control)."""
    from adaspec.core.heads.adaptive import AdaptiveConfig, AdaptiveFeatures, AdaptiveHead

    torch.manual_seed(0)
    head = AdaptiveHead(AdaptiveConfig(hidden_size=8, vocab_size=20, inner_size=16), torch.randn(20, 8),
                        torch.randn(20, 8))
    with torch.no_grad():
        head.down.weight.normal_()
    feats = AdaptiveFeatures(torch.randn(6, 8), torch.randint(0, 20, (6,)))
    y = torch.tensor([1, 3, 5, 7, 9, 11])
    ids = torch.tensor([0, 1, 2, 3, 4, 5])  # 7, 9, 11 are outside
    g = head.step(feats.hidden, feats.tokens).float()
    full, _ = head.loss(feats, y)
    assert torch.allclose(full, torch.nn.functional.cross_entropy(g @ head.lm_head_weight.T, y))
    head.set_draft_vocab(ids)
    draft, stats = head.loss(feats, y)
    want = torch.nn.functional.cross_entropy(g[:3] @ head.lm_head_weight[ids].T, torch.tensor([1, 3, 5]))
    assert torch.allclose(draft, want) and stats["tokens"] == 3.0


def test_adapter_chain_forward_equals_the_unrolled_training_pass_at_its_rows():
    """The learner's row-wise pass (frozen step-0 cache computed once) computes what the full EAGLE-3 TTT pass
    with the adapter computes at those rows; a fresh adapter leaves the static head's pass unchanged."""
    from adaspec.core.heads.eagle3 import Eagle3Config, Eagle3Head
    from adaspec.core.heads.static_adapter import AdapterConfig, StaticAdapter

    torch.manual_seed(0)
    cfg = Eagle3Config(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=50,
                       aux_layers=(0, 1, 2), target_num_layers=4)
    head = Eagle3Head(cfg, torch.randn(50, 32), torch.randn(50, 32))
    for m in head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.1)
    B, T, steps = 2, 10, 3
    tokens, aux = torch.randint(0, 50, (B, T + steps - 1)), torch.randn(B, T, 96)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 7:] = False
    adapter = StaticAdapter(head, AdapterConfig(rank=4, out_inner=16))
    static = head.ttt_forward(tokens, aux, valid, steps)
    for a, b in zip(head.ttt_forward(tokens, aux, valid, steps, layer=adapter), static):
        assert torch.equal(a, b)  # version 0: bit-identical
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    full = head.ttt_forward(tokens, aux, valid, steps, layer=adapter)
    rows = [torch.tensor([0, 3, 9]), torch.tensor([2, 6])]
    part = adapter.chain_forward(tokens, aux, valid, steps, rows)
    for i in range(steps):
        ref = torch.cat([full[i][b, rows[b]] for b in range(B)])
        assert torch.allclose(part[i], ref, atol=1e-5)
        assert not torch.allclose(ref, torch.cat([static[i][b, rows[b]] for b in range(B)]), atol=1e-3)
