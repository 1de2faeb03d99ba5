"""Tests for the suffix drafter, its index, matcher and caches, and the greedy replay (no model needed)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import pytest

from adaspec.core.bench.suffix import run_benchmark, synthetic_workload
from adaspec.core.drafters.base import Draft, Drafter, DrafterBase, DraftRequest, Observation
from adaspec.core.drafters.suffix import SuffixDrafter
from adaspec.core.drafters.suffix.cache import TenantCaches
from adaspec.core.drafters.suffix.match import ContextMatcher
from adaspec.core.drafters.suffix.tree import NO_CHILD, ROOT, SuffixIndex
from adaspec.core.bench.suffix_replay import ReplayRequest, simulate_greedy, simulate_greedy_batch

# ---------------------------------------------------------------------- helpers


def _brute_counts(docs: Sequence[Sequence[int]], height: int) -> tuple[dict, dict]:
    """Occurrences of every substring up to `height` tokens, and how many are followed by a token."""
    occ: dict[tuple[int, ...], int] = {}
    followed: dict[tuple[int, ...], int] = {}
    for d in docs:
        for i in range(len(d)):
            for n in range(1, min(height, len(d) - i) + 1):
                s = tuple(d[i : i + n])
                occ[s] = occ.get(s, 0) + 1
                if i + n < len(d) and n < height:
                    followed[s] = followed.get(s, 0) + 1
    return occ, followed


def _check_index(index: SuffixIndex, docs: Sequence[Sequence[int]]) -> None:
    occ, followed = _brute_counts(docs, index.height)
    for s, c in occ.items():
        assert index.occurrences(s) == c, s
        assert index.continuations(s) == followed.get(s, 0), s
        if c >= 2:  # repeated strings are materialized nodes
            found = index.find(s)
            assert found is not None and found[1] == -1, s
    assert index.token_count == sum(len(d) for d in docs)
    alive = set(range(len(index.count))) - set(index._free)
    for v in alive:
        kids = dict(index.children(v))
        assert index.out[v] == sum(index.child_count(c) for c in kids.values())
        if kids:
            assert index.topc[v] == index.child_count(kids[index.top[v]])
            assert index.topc[v] == max(index.child_count(c) for c in kids.values())
        else:
            assert index.top[v] == NO_CHILD
        for c in kids.values():
            if c >= 0:
                assert c in alive and index.depth[c] == index.depth[v] + 1
                assert index.link[c] in alive and index.depth[index.link[c]] == index.depth[c] - 1


def _longest_seen_suffix(context: Sequence[int], docs: Sequence[Sequence[int]], height: int) -> int:
    best = 0
    for n in range(1, min(height, len(context)) + 1):
        s = list(context[-n:])
        if any(s == list(d[j : j + n]) for d in docs for j in range(len(d) - n + 1)):
            best = n
    return best


def _req(
    tokens: Sequence[int], rid: str = "r", tenant: str = "default", prompt_len: int | None = None
) -> DraftRequest:
    return DraftRequest(rid, list(tokens), len(tokens) if prompt_len is None else prompt_len, tenant)


def _propose(
    drafter: SuffixDrafter, tokens: Sequence[int], k: int = 16, rid: str = "r", tenant: str = "default"
) -> Draft:
    return drafter.propose([_req(tokens, rid, tenant)], [k])[0]


def _cache(drafter: SuffixDrafter, responses: Sequence[Sequence[int]], tenant: str = "default") -> None:
    """Cache responses the way the engine does: a request finishing with that output."""
    for i, r in enumerate(responses):
        drafter.finish(DraftRequest(f"done{i}", [999] + list(r), 1, tenant))


# ---------------------------------------------------------------------- the index


def test_index_counts_match_brute_force_through_adds_removes_and_live_growth() -> None:
    rng = random.Random(0)
    for _ in range(120):
        index = SuffixIndex(rng.randint(1, 5))
        alphabet = rng.randint(1, 4)
        docs: dict[int, list[int]] = {}
        for _ in range(rng.randint(1, 10)):
            if docs and rng.random() < 0.35:
                doc = rng.choice(list(docs))
                index.remove_document(doc)
                del docs[doc]
                _check_index(index, list(docs.values()))
                continue
            tokens = [rng.randrange(alphabet) for _ in range(rng.randint(0, 14))]
            doc = index.open_document()
            done = 0
            while done < len(tokens):  # grow it like a live request, checking the tail as it goes
                step = rng.randint(1, 3)
                index.extend(doc, tokens[done : done + step])
                done = min(done + step, len(tokens))
                prefix = tokens[:done]
                deepest = max(
                    (n for n in range(1, min(index.height, done) + 1) if index.occurrences(prefix[-n:]) >= 2),
                    default=0,
                )
                assert index.depth[index.tail(doc)] == deepest
            index.close_document(doc)
            docs[doc] = tokens
            _check_index(index, list(docs.values()))
        for doc in list(docs):
            index.remove_document(doc)
        assert index.node_count == 1 and index.leaf_count == 0 and index.out[ROOT] == 0


def test_matcher_tracks_the_longest_suffix_found_in_the_index() -> None:
    rng = random.Random(1)
    for _ in range(150):
        index = SuffixIndex(rng.randint(1, 6))
        alphabet = rng.randint(1, 4)
        sizes = [rng.randint(0, 18) for _ in range(rng.randint(1, 4))]
        docs = [[rng.randrange(alphabet) for _ in range(n)] for n in sizes]
        ids = [index.add_document(d) for d in docs]
        if len(ids) > 1 and rng.random() < 0.5:
            index.remove_document(ids[0])
            docs = docs[1:]
        context = [rng.randrange(alphabet + 1) for _ in range(rng.randint(0, 30))]
        matcher = ContextMatcher(index)
        for i, t in enumerate(context):
            matcher.feed(t)
            assert matcher.match_len == _longest_seen_suffix(context[: i + 1], docs, index.height)
        assert ContextMatcher(index, context).match_len == matcher.match_len


# ---------------------------------------------------------------------- drafting


def test_drafter_satisfies_the_protocol() -> None:
    drafter = SuffixDrafter()
    assert isinstance(drafter, Drafter)
    assert drafter.name == "suffix" and drafter.hidden_layers == ()


def test_repeated_pattern_in_the_context_is_drafted() -> None:
    pattern = [5, 6, 7, 8, 9]
    context = [1, 2, 3] + pattern * 4 + [5, 6]
    draft = _propose(SuffixDrafter(), context, k=12)
    assert draft.tokens == [7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8]  # whole periods, past the live end
    assert draft.q is None
    assert all(c == 1.0 for c in draft.confidence)


def test_prompt_copy_is_drafted_from_the_request_context() -> None:
    rng = random.Random(2)
    prompt = [rng.randrange(1000) for _ in range(300)]
    context = prompt + prompt[100:120]  # the output started copying a span of the prompt
    draft = _propose(SuffixDrafter(), context, k=10)
    assert draft.tokens == prompt[120:130]


def test_confidence_is_the_continuation_frequency() -> None:
    drafter = SuffixDrafter()
    _cache(drafter, [[1, 2, 3, 10, 11]] * 3 + [[1, 2, 3, 20, 21]])
    draft = _propose(drafter, [50, 1, 2, 3])
    assert draft.tokens == [10, 11]
    assert draft.confidence == pytest.approx([0.75, 1.0])
    assert all(0.0 <= c <= 1.0 for c in draft.confidence)


def test_min_token_prob_and_spec_factor_shorten_the_chain() -> None:
    responses = [[1, 2, 3, 10, 11]] * 3 + [[1, 2, 3, 20, 21]]
    strict = SuffixDrafter(min_token_prob=0.8)
    _cache(strict, responses)
    assert _propose(strict, [50, 1, 2, 3]).tokens == []  # 0.75 < 0.8
    short = SuffixDrafter(spec_factor=0.5)  # match of 3 tokens earns int(1.5) = 1 draft token
    _cache(short, responses)
    assert _propose(short, [50, 1, 2, 3]).tokens == [10]


def test_k_and_max_spec_tokens_bound_the_draft() -> None:
    context = [4, 5, 6] * 30
    drafter = SuffixDrafter(max_spec_tokens=7)
    assert _propose(drafter, context, k=0) == Draft()
    assert len(_propose(drafter, context, k=1).tokens) == 1
    assert len(_propose(drafter, context, k=5).tokens) == 5
    assert len(_propose(drafter, context, k=50).tokens) == 7
    drafts = drafter.propose([_req(context, "a"), _req(context, "b")], [2, 0])
    assert [len(d.tokens) for d in drafts] == [2, 0]
    with pytest.raises(ValueError):
        drafter.propose([_req(context)], [1, 2])


def test_random_drafts_respect_k_and_carry_valid_confidences() -> None:
    rng = random.Random(3)
    drafter = SuffixDrafter(max_depth=8)
    _cache(drafter, [[rng.randrange(6) for _ in range(60)] for _ in range(10)])
    for i in range(200):
        context = [rng.randrange(6) for _ in range(rng.randint(1, 80))]
        k = rng.randint(0, 12)
        draft = _propose(drafter, context, k=k, rid=f"x{i}")
        assert len(draft.tokens) <= k
        assert len(draft.confidence) == len(draft.tokens)
        assert all(0.0 <= c <= 1.0 for c in draft.confidence)
        cumulative = math.prod(draft.confidence)
        assert not draft.tokens or cumulative >= drafter.min_token_prob


def test_drafts_are_deterministic() -> None:
    rng = random.Random(4)
    responses = [[rng.randrange(5) for _ in range(40)] for _ in range(6)]
    contexts = [[rng.randrange(5) for _ in range(30)] for _ in range(20)]
    runs = []
    for _ in range(2):
        drafter = SuffixDrafter(max_depth=6)
        _cache(drafter, responses)
        runs.append([_propose(drafter, c, k=8, rid=f"d{i}") for i, c in enumerate(contexts)])
    assert runs[0] == runs[1]


def test_observe_keeps_the_request_in_sync_with_its_tokens() -> None:
    """Drafts are the same whether the request is synced through observe or only from request.tokens."""
    rng = random.Random(5)
    prompt = [rng.randrange(8) for _ in range(60)]
    output = [rng.randrange(8) for _ in range(80)]
    with_observe, without = SuffixDrafter(max_depth=10), SuffixDrafter(max_depth=10)
    for d in (with_observe, without):
        d.start(_req(prompt, prompt_len=len(prompt)))
    with_observe.observe([Observation("r", list(prompt), None, output[0])])
    pos = 1
    while pos < len(output):
        request = _req(prompt + output[:pos], prompt_len=len(prompt))
        a = with_observe.propose([request], [4])[0]
        assert a == without.propose([request], [4])[0]
        new_pos = min(len(output), pos + rng.randint(1, 4))
        with_observe.observe([Observation("r", output[pos - 1 : new_pos - 1], None, output[new_pos - 1])])
        pos = new_pos
    # an observation that contradicts the indexed tokens makes the drafter re-index from request.tokens
    with_observe.observe([Observation("r", [12345], None, 6789)])
    request = _req(prompt + output, prompt_len=len(prompt))
    assert with_observe.propose([request], [4]) == without.propose([request], [4])


# ---------------------------------------------------------------------- the tenant caches


def test_past_responses_are_drafted_for_the_same_tenant_only() -> None:
    drafter = SuffixDrafter()
    response = list(range(100, 140))
    _cache(drafter, [response], tenant="acme")
    context = [7, 8, 9] + response[:10]
    assert _propose(drafter, context, k=5, tenant="acme").tokens == response[10:15]
    assert _propose(drafter, context, k=5, rid="other", tenant="globex").tokens == []


def test_eviction_removes_a_response_and_its_unique_continuation() -> None:
    drafter = SuffixDrafter(cache_max_responses=2)
    unique = [1, 2, 3, 4, 77, 78, 79]
    _cache(drafter, [unique])
    # a live request located inside the response that is about to be evicted
    assert _propose(drafter, [50, 1, 2, 3, 4], rid="live").tokens == [77, 78, 79]
    _cache(drafter, [[60, 61, 62, 63], [70, 71, 72, 73]])  # pushes `unique` out (FIFO)
    cache = drafter.cache_for("default")
    assert cache is not None and cache.responses == 2
    assert cache.index.occurrences([77]) == 0 and cache.index.occurrences([1, 2, 3]) == 0
    assert _propose(drafter, [50, 1, 2, 3, 4], rid="live").tokens == []
    assert _propose(drafter, [50, 1, 2, 3, 4], rid="fresh").tokens == []


def test_eviction_restores_the_next_most_frequent_continuation() -> None:
    drafter = SuffixDrafter(cache_max_responses=3, min_token_prob=0.0)
    _cache(drafter, [[1, 2, 3, 40], [1, 2, 3, 40], [1, 2, 3, 50]])
    assert _propose(drafter, [9, 1, 2, 3], k=1).tokens == [40]
    _cache(drafter, [[1, 2, 3, 50], [8, 8]])  # evicts both [.., 40] responses
    draft = _propose(drafter, [9, 1, 2, 3], k=1, rid="again")
    assert draft.tokens == [50] and draft.confidence == [1.0]


def test_cache_memory_stays_bounded_under_churn() -> None:
    rng = random.Random(6)
    caches = TenantCaches(max_depth=8, max_responses=5, max_tokens=120, max_tenants=2)
    for i in range(200):
        tenant = f"t{i % 3}"
        caches.add(tenant, [rng.randrange(20) for _ in range(rng.randint(1, 50))])
        assert len(caches) <= 2
        for name in ("t0", "t1", "t2"):
            cache = caches.peek(name)
            if cache is None:
                continue
            assert cache.responses <= 5 and cache.tokens <= 120
            index = cache.index
            assert index.node_count <= 1 + index.token_count * index.height
            assert index.leaf_count <= index.token_count
    cache = caches.get("t1")  # the last tenant added to
    assert cache is not None and cache.responses > 0
    for doc in list(cache.index.docs):
        cache.index.remove_document(doc)
    assert cache.index.node_count == 1 and cache.index.leaf_count == 0  # nothing left behind


def test_least_recently_used_tenant_is_dropped() -> None:
    caches = TenantCaches(max_depth=4, max_responses=4, max_tokens=100, max_tenants=2)
    caches.add("a", [1, 2])
    caches.add("b", [3, 4])
    assert caches.get("a") is not None  # a is now more recent than b
    caches.add("c", [5, 6])
    assert "a" in caches and "c" in caches and "b" not in caches


# ---------------------------------------------------------------------- replay


class _NullDrafter(DrafterBase):
    name = "null"
    hidden_layers: tuple[int, ...] = ()

    def start(self, request: DraftRequest) -> None: ...

    def observe(self, observations: Sequence[Observation]) -> None: ...

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        return [Draft() for _ in requests]

    def finish(self, request: DraftRequest) -> None: ...


@dataclass
class _ScriptedDrafter(DrafterBase):
    """Proposes a fixed draft per step and records every call."""

    drafts: list[list[int]]
    name: str = "scripted"
    hidden_layers: tuple[int, ...] = ()
    calls: list[tuple] = field(default_factory=list)

    def start(self, request: DraftRequest) -> None:
        self.calls.append(("start", list(request.tokens)))

    def observe(self, observations: Sequence[Observation]) -> None:
        for o in observations:
            self.calls.append(("observe", list(o.tokens), o.next_token))

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        self.calls.append(("propose", list(requests[0].tokens), ks[0]))
        tokens = self.drafts.pop(0)
        return [Draft(tokens, [1.0] * len(tokens))]

    def finish(self, request: DraftRequest) -> None:
        self.calls.append(("finish", list(request.tokens)))


def test_replay_of_a_drafter_that_proposes_nothing_has_tau_one() -> None:
    result = simulate_greedy(_NullDrafter(), [1, 2], list(range(10, 30)), k=4)
    assert (result.steps, result.tokens, result.tau) == (20, 20, 1.0)


def test_replay_matches_a_hand_computed_example() -> None:
    prompt, output = [1, 2], [10, 11, 12, 13, 14, 15, 16]
    # step 1 (pos 1): 2 of 3 accepted, + correction -> pos 4; step 2 (pos 4): all 3 accepted -> pos 7 (capped)
    drafter = _ScriptedDrafter([[11, 12, 99], [14, 15, 16]])
    result = simulate_greedy(drafter, prompt, output, k=3)
    assert (result.steps, result.tokens) == (3, 7)  # prefill + 2 verify forwards
    assert result.tau == pytest.approx(7 / 3)
    assert drafter.calls == [
        ("start", [1, 2]),
        ("observe", [1, 2], 10),  # prefill
        ("propose", [1, 2, 10], 3),
        ("observe", [10, 11, 12], 13),  # pending + 2 accepted; 13 is the correction
        ("propose", [1, 2, 10, 11, 12, 13], 3),
        ("observe", [13, 14, 15], 16),  # output ends: the last accepted draft is the final token
        ("finish", [1, 2, 10, 11, 12, 13, 14, 15, 16]),
    ]


def test_replay_rejects_drafts_longer_than_k() -> None:
    with pytest.raises(ValueError):
        simulate_greedy(_ScriptedDrafter([[10, 11, 12]]), [1], [9, 10, 11, 12], k=2)


def test_suffix_drafter_replay_gains_on_repeated_responses() -> None:
    rng = random.Random(7)
    output = [rng.randrange(1000) for _ in range(120)]
    drafter = SuffixDrafter()
    first = simulate_greedy(drafter, [1, 2, 3], output, k=8, request_id="a")
    second = simulate_greedy(drafter, [4, 5, 6], output, k=8, request_id="b")
    assert first.tau == 1.0  # nothing to copy from yet
    # second: drafts are as long as the match (spec_factor 1) up to k: positions 1 -> 3 -> 7 -> 15, then
    # 9 tokens per step (8 drafts + 1) for the remaining 105: 12 steps; plus the prefill.
    assert second.steps == 1 + 3 + 12
    assert second.tau == pytest.approx(120 / 16)


def test_batched_replay_with_one_slot_equals_sequential_replay() -> None:
    rng = random.Random(8)
    reqs = [
        ReplayRequest([rng.randrange(30) for _ in range(40)], [rng.randrange(30) for _ in range(50)], f"q{i}")
        for i in range(4)
    ]
    drafter = SuffixDrafter()
    seq = [simulate_greedy(drafter, r.prompt, r.output, 6, r.request_id) for r in reqs]
    assert simulate_greedy_batch(SuffixDrafter(), reqs, 6, concurrency=1) == seq
    batched = simulate_greedy_batch(SuffixDrafter(), reqs, 6, concurrency=3)
    assert [r.tokens for r in batched] == [50] * 4 and all(r.tau >= 1.0 for r in batched)


# ---------------------------------------------------------------------- cost (smoke test; timing is benched)


def test_propose_cost_benchmark_runs_on_a_small_workload() -> None:
    workload = synthetic_workload(seed=1, cached=20, requests=3, prompt_len=(100, 200), output_len=(40, 80))
    result = run_benchmark(workload, depth=32, k=16, concurrency=2)
    assert result.propose_calls > 0
    assert 0 < result.propose_p50_us <= result.propose_p95_us
    assert result.cache_nodes > 1 and result.cache_bytes > 0
    assert result.cache_responses == 20
    assert result.synthetic_tau > 1.0  # the copies in the workload get drafted
