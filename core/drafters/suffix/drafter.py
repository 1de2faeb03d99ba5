"""The model-free suffix drafter (after SuffixDecoding, arXiv 2411.04975).

It drafts by pattern matching, no model involved. Two sources are searched each step:

- the request's own context (prompt + output so far), indexed as it grows: outputs that copy from the prompt
  or repeat themselves (code edits, structured data, agent loops) are drafted from here;
- a bounded cache of the tenant's past responses: recurring answers are drafted from here.

In each source the longest suffix of the context seen before (up to `max_depth` tokens) is located, and the
draft follows its most frequent continuation greedily. Each draft token's confidence is its frequency
probability count(continuation) / count(followed occurrences); the chain stops when the cumulative
probability drops below `min_token_prob`, and its length is capped at `spec_factor * match_length` (short
matches are weak evidence, so they earn short drafts). The source whose chain has the higher expected
accepted length (sum of cumulative probabilities) wins. Everything is deterministic: q is None.

Updates: `observe` appends the tokens a step accepted (and the target's next token) to the request's index and
advances its cache matcher, so `propose` only drafts. `DraftRequest.tokens` stays the truth, though: `propose`
appends whatever `observe` did not deliver, and rebuilds the request's state if the two ever disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from adaspec.core.drafters.base import Draft, DraftRequest, DrafterBase, JoinedTokens, Observation
from .cache import ResponseCache, TenantCaches
from .chain import EMPTY_CHAIN, Chain, greedy_chain
from .match import ChainStart, ContextMatcher, node_start
from .tree import SuffixIndex


def _as_ints(tokens: Sequence[int]) -> Sequence[int]:
    """Token ids as plain ints: sequences (lists, a server's `JoinedTokens` view) pass through, a tensor or
    numpy array is converted once."""
    if isinstance(tokens, (list, tuple, JoinedTokens)):
        return tokens
    tolist = getattr(tokens, "tolist", None)
    return tolist() if tolist is not None else list(tokens)


@dataclass
class _RequestState:
    """A request's index over its context (one open document) and its matcher into the tenant's cache."""

    index: SuffixIndex
    doc: int
    #: how many indexed tokens the target's KV cache holds; the next observation's tokens start there.
    kv_len: int = 0
    matcher: ContextMatcher | None = None

    @property
    def tokens(self) -> list[int]:
        return self.index.docs[self.doc]

    def append(self, new: list[int]) -> None:
        self.index.extend(self.doc, new)
        matcher = self.matcher
        if matcher is not None and not matcher.stale:  # a stale matcher is rebuilt by the next propose
            for t in new:
                matcher.feed(t)


class SuffixDrafter(DrafterBase):
    """Suffix-tree drafter over the request's context and a per-tenant cache of past responses.

    Args:
        max_depth: longest context suffix matched (tokens); deeper means more specific matches and more
            index nodes per token.
        max_spec_tokens: hard cap on draft length, whatever k the controller asks for.
        spec_factor: adaptive length; a draft is at most `spec_factor * match_length` tokens.
        min_token_prob: stop extending once the chain's cumulative frequency probability falls below this.
        cache_max_responses: per tenant, at most this many past responses are cached (oldest evicted first).
        cache_max_tokens: per tenant, at most this many cached tokens (oldest responses evicted first). The
            benchmark measures about 0.6 KiB per cached token at depth 32 on repetitive text, so the defaults
            bound the caches near 80 MiB per tenant.
        max_tenants: at most this many tenant caches (least recently used tenant dropped).
    """

    name = "suffix"
    hidden_layers: tuple[int, ...] = ()

    def __init__(
        self,
        max_depth: int = 32,
        max_spec_tokens: int = 32,
        spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
        cache_max_responses: int = 1024,
        cache_max_tokens: int = 1 << 17,
        max_tenants: int = 8,
    ) -> None:
        if max_spec_tokens < 0 or spec_factor < 0 or not 0.0 <= min_token_prob <= 1.0:
            raise ValueError("max_spec_tokens, spec_factor >= 0 and 0 <= min_token_prob <= 1 required")
        self.max_depth = max_depth
        self.max_spec_tokens = max_spec_tokens
        self.spec_factor = spec_factor
        self.min_token_prob = min_token_prob
        self.caches = TenantCaches(max_depth, cache_max_responses, cache_max_tokens, max_tenants)
        self._requests: dict[str, _RequestState] = {}

    # ------------------------------------------------------------------ Drafter protocol

    def start(self, request: DraftRequest) -> None:
        """Index the prompt now, so the first decode step only pays for what is new."""
        self._requests.pop(request.request_id, None)
        self._sync(request).kv_len = 0

    def observe(self, observations: Sequence[Observation]) -> None:
        """Append each step's accepted tokens and the target's next token to the request's index.

        The step's tokens were written to the KV cache right after the `kv_len` tokens already there; where
        they overlap what is indexed (the pending token), they must agree, else the request is re-indexed
        from `DraftRequest.tokens` at the next propose.
        """
        for obs in observations:
            state = self._requests.get(obs.request_id)
            if state is None:
                continue
            seq = state.tokens
            implied = list(_as_ints(obs.tokens))
            implied.append(int(obs.next_token))
            base = state.kv_len
            overlap = min(len(seq) - base, len(implied))
            if overlap < 0 or seq[base : base + overlap] != implied[:overlap]:
                del self._requests[obs.request_id]
                continue
            if overlap < len(implied):
                state.append(implied[overlap:])
            state.kv_len = base + len(obs.tokens)

    def propose(self, requests: Sequence[DraftRequest], ks: Sequence[int]) -> list[Draft]:
        if len(requests) != len(ks):
            raise ValueError(f"{len(requests)} requests but {len(ks)} draft lengths")
        return [self._propose_one(request, k) for request, k in zip(requests, ks)]

    def finish(self, request: DraftRequest) -> None:
        """Forget the request and cache its response for the tenant's future requests."""
        self._requests.pop(request.request_id, None)
        response = list(_as_ints(request.tokens)[request.prompt_len :])
        if response:
            self.caches.add(request.tenant, response)

    # ------------------------------------------------------------------ internals

    def cache_for(self, tenant: str) -> ResponseCache | None:
        """The tenant's response cache, if it has one yet."""
        return self.caches.get(tenant)

    @property
    def live_requests(self) -> int:
        return len(self._requests)

    def _propose_one(self, request: DraftRequest, k: int) -> Draft:
        state = self._sync(request)
        k = min(k, self.max_spec_tokens)
        if k <= 0:
            return Draft()
        index = state.index
        best = self._chain(index, node_start(index, index.tail(state.doc)), k, live_doc=state.doc)
        if state.matcher is not None:
            cached = self._chain(state.matcher.index, state.matcher.start(), k)
            if cached.score > best.score:
                best = cached
        return Draft(best.tokens, best.confidence)

    def _chain(self, index: SuffixIndex, start: ChainStart, k: int, live_doc: int = -1) -> Chain:
        budget = min(k, int(self.spec_factor * start.match_len))
        if budget <= 0:
            return EMPTY_CHAIN
        return greedy_chain(index, start, budget, self.min_token_prob, live_doc)

    def _sync(self, request: DraftRequest) -> _RequestState:
        """Bring the request's index and cache matcher up to date with request.tokens (append-only)."""
        tokens = _as_ints(request.tokens)
        n = len(tokens)
        state = self._requests.get(request.request_id)
        if state is not None:
            seq = state.tokens
            m = len(seq)
            if n < m or (m and tokens[m - 1] != seq[-1]):
                state = None  # the engine rewrote history: start over
        if state is None:
            index = SuffixIndex(self.max_depth)
            state = _RequestState(index, index.open_document())
            self._requests[request.request_id] = state
        m = len(state.tokens)
        new = list(tokens[m:n]) if n > m else []
        cache = self.caches.get(request.tenant)
        matcher = state.matcher
        if cache is None:
            state.matcher = None
        elif matcher is None or matcher.index is not cache.index or matcher.stale:
            state.matcher = None
            if new:
                state.append(new)
            state.matcher = ContextMatcher(cache.index, tokens)
            new = []
        if new:
            state.append(new)
        state.kv_len = max(n - 1, 0)  # the last token is the draft root, not yet in the KV cache
        return state
