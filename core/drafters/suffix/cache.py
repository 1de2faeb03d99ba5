"""Bounded per-tenant caches of past responses, each indexed by its own `SuffixIndex`.

Why bounded twice: a tenant's cache holds at most `max_responses` responses and `max_tokens` tokens (oldest
evicted first, FIFO), and at most `max_tenants` tenants are kept (least recently used dropped whole). The
index's node count is bounded by its token count times its height, so memory is bounded by construction.
Why per tenant: one tenant's traffic must neither leak into nor crowd out another's drafts.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Sequence

from .tree import SuffixIndex


class ResponseCache:
    """One tenant's past responses, FIFO-evicted to stay within its budgets."""

    def __init__(self, max_depth: int, max_responses: int, max_tokens: int) -> None:
        if max_responses < 1 or max_tokens < 1:
            raise ValueError("a response cache needs room for at least one response and one token")
        self.index = SuffixIndex(max_depth)
        self.max_responses = max_responses
        self.max_tokens = max_tokens
        self._fifo: deque[int] = deque()  # doc ids, oldest first

    @property
    def responses(self) -> int:
        return len(self._fifo)

    @property
    def tokens(self) -> int:
        return self.index.token_count

    def add(self, response: Sequence[int]) -> None:
        """Cache a finished response (its first `max_tokens` tokens), evicting the oldest to make room."""
        response = list(response[: self.max_tokens])
        if not response:
            return
        while self._fifo and (
            len(self._fifo) >= self.max_responses or self.index.token_count + len(response) > self.max_tokens
        ):
            self.index.remove_document(self._fifo.popleft())
        self._fifo.append(self.index.add_document(response))


class TenantCaches:
    """Response caches keyed by tenant, least recently used tenant dropped beyond `max_tenants`."""

    def __init__(self, max_depth: int, max_responses: int, max_tokens: int, max_tenants: int) -> None:
        if max_tenants < 1:
            raise ValueError("max_tenants must be >= 1")
        self.max_depth = max_depth
        self.max_responses = max_responses
        self.max_tokens = max_tokens
        self.max_tenants = max_tenants
        self._caches: OrderedDict[str, ResponseCache] = OrderedDict()

    def __len__(self) -> int:
        return len(self._caches)

    def __contains__(self, tenant: str) -> bool:
        return tenant in self._caches

    def get(self, tenant: str) -> ResponseCache | None:
        """The tenant's cache if it has one (marks the tenant recently used)."""
        cache = self._caches.get(tenant)
        if cache is not None:
            self._caches.move_to_end(tenant)
        return cache

    def peek(self, tenant: str) -> ResponseCache | None:
        """The tenant's cache if it has one, without marking it used."""
        return self._caches.get(tenant)

    def add(self, tenant: str, response: Sequence[int]) -> None:
        """Cache a finished response under `tenant`, creating (and maybe evicting a tenant for) its cache."""
        cache = self.get(tenant)
        if cache is None:
            cache = ResponseCache(self.max_depth, self.max_responses, self.max_tokens)
            self._caches[tenant] = cache
            while len(self._caches) > self.max_tenants:
                self._caches.popitem(last=False)
        cache.add(response)
