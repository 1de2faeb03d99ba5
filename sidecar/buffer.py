"""Bounded replay buffer: per-tenant rings of training samples, drawn with recency-weighted sampling.

Each tenant owns a ring (grown on demand up to `capacity`, oldest overwritten), so one busy tenant cannot
evict another's history; beyond `max_tenants` the least recently fed tenant is dropped. A draw picks
tenants by size^(1 - balance) and, inside a tenant, samples with weight 0.5^(age / half_life), age counted
in newer samples of that tenant -- recent traffic dominates, old traffic still regularises.
"""

from __future__ import annotations

import collections

import torch
from torch import Tensor

from adaspec.core.heads.adaptive import IGNORE, AdaptiveFeatures
from adaspec.sidecar.samples import Samples


class TenantRing:
    """Fixed-capacity ring of (hidden, token, targets) samples; grows its storage geometrically up to capacity."""

    def __init__(self, hidden_size: int, width: int, capacity: int) -> None:
        self.capacity, self.hidden_size, self.width = capacity, hidden_size, width
        self._alloc(min(capacity, 256))
        self.size = 0
        self.next = 0  # slot the next sample goes to
        self.stamp = 0  # samples ever added

    def _alloc(self, n: int) -> None:
        self.hidden = torch.zeros(n, self.hidden_size)
        self.tokens = torch.zeros(n, dtype=torch.long)
        self.targets = torch.full((n, self.width), IGNORE, dtype=torch.long)
        self.stamps = torch.zeros(n, dtype=torch.long)

    def _grow(self, need: int) -> None:
        cur = self.hidden.shape[0]
        if need <= cur or cur >= self.capacity:
            return
        n = min(self.capacity, max(need, 2 * cur))
        old = (self.hidden, self.tokens, self.targets, self.stamps)
        self._alloc(n)
        # before the ring first wraps, slots 0..size-1 are in order
        for dst, src in zip((self.hidden, self.tokens, self.targets, self.stamps), old):
            dst[: self.size] = src[: self.size]

    def add(self, hidden: Tensor, tokens: Tensor, targets: Tensor) -> None:
        n = int(tokens.shape[0])
        if n > self.capacity:  # only the newest fit
            hidden, tokens, targets = hidden[-self.capacity:], tokens[-self.capacity:], targets[-self.capacity:]
            self.stamp += n - self.capacity
            n = self.capacity
        self._grow(self.size + n)
        cap = self.hidden.shape[0]
        slots = (self.next + torch.arange(n)) % cap
        self.hidden[slots] = hidden.to(torch.float32)
        self.tokens[slots] = tokens
        self.targets[slots] = targets[:, : self.width]
        self.stamps[slots] = self.stamp + torch.arange(n)
        self.stamp += n
        self.next = int((self.next + n) % cap)
        self.size = min(cap, self.size + n)

    def weights(self, half_life: float) -> Tensor:
        age = (self.stamp - 1 - self.stamps[: self.size]).to(torch.float64)
        return torch.exp2(-age / half_life)

    def newest(self, n: int) -> Tensor:
        """Slot indices of the newest n samples."""
        order = torch.argsort(self.stamps[: self.size], descending=True)
        return order[:n]

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.hidden[idx], self.tokens[idx], self.targets[idx]

    def state(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        """The ring's filled slots (tensors) and counters, for a checkpoint."""
        n = self.size
        tensors = {"hidden": self.hidden[:n].clone(), "tokens": self.tokens[:n].clone(),
                   "targets": self.targets[:n].clone(), "stamps": self.stamps[:n].clone()}  # a snapshot
        return tensors, {"size": n, "next": self.next, "stamp": self.stamp, "slots": int(self.hidden.shape[0])}

    @classmethod
    def restore(cls, hidden_size: int, width: int, capacity: int, tensors: dict[str, Tensor],
                counters: dict[str, int]) -> "TenantRing":
        """A ring from `state()`; ValueError if its shapes do not fit this buffer's layout."""
        n, slots = int(counters["size"]), int(counters["slots"])
        h, tok, tgt, st = tensors["hidden"], tensors["tokens"], tensors["targets"], tensors["stamps"]
        if not (0 <= n <= slots <= capacity and 0 <= int(counters["next"]) < max(slots, 1)
                and tuple(h.shape) == (n, hidden_size) and tuple(tok.shape) == (n,)
                and tuple(tgt.shape) == (n, width) and tuple(st.shape) == (n,)):
            raise ValueError(f"ring of {n}/{slots} samples does not fit (hidden {hidden_size}, width {width}, "
                             f"capacity {capacity})")
        ring = cls(hidden_size, width, capacity)
        ring._alloc(max(slots, 1))
        ring.hidden[:n], ring.tokens[:n], ring.targets[:n], ring.stamps[:n] = h.float(), tok.long(), tgt.long(), st.long()
        ring.size, ring.next, ring.stamp = n, int(counters["next"]), int(counters["stamp"])
        return ring


class ReplayBuffer:
    """Per-tenant rings with a tenant LRU; `sample` draws a recency-weighted batch across tenants."""

    def __init__(
        self,
        hidden_size: int,
        width: int,
        tenant_capacity: int,
        max_tenants: int = 16,
        half_life: float = 2048.0,
        tenant_balance: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.hidden_size, self.width = hidden_size, width
        self.tenant_capacity, self.max_tenants = tenant_capacity, max_tenants
        self.half_life, self.tenant_balance = half_life, tenant_balance
        self.rings: collections.OrderedDict[str, TenantRing] = collections.OrderedDict()
        self.added = 0
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return sum(r.size for r in self.rings.values())

    @property
    def capacity(self) -> int:
        return self.tenant_capacity * self.max_tenants

    def fill(self) -> dict[str, int]:
        return {t: r.size for t, r in self.rings.items()}

    def add(self, samples: Samples, require_full: bool = False) -> int:
        """Add samples (keeping, with `require_full`, only those whose every target is known); returns count."""
        hidden, tokens, targets = samples.hidden, samples.tokens, samples.targets
        if require_full:
            keep = (targets[:, : self.width] != IGNORE).all(dim=1)
            hidden, tokens, targets = hidden[keep], tokens[keep], targets[keep]
        n = int(tokens.shape[0])
        if n == 0:
            return 0
        ring = self.rings.get(samples.tenant)
        if ring is None:
            ring = TenantRing(self.hidden_size, self.width, self.tenant_capacity)
            self.rings[samples.tenant] = ring
            while len(self.rings) > self.max_tenants:
                self.rings.popitem(last=False)
        self.rings.move_to_end(samples.tenant)
        ring.add(hidden, tokens, targets)
        self.added += n
        return n

    def clear(self) -> None:
        self.rings.clear()

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Every ring's samples as flat named tensors, and the layout/counters (JSON-able) to rebuild them:
        what a checkpoint keeps so a restart resumes with the same replay history (bounded by the capacity)."""
        tensors: dict[str, Tensor] = {}
        rings = []
        for i, (tenant, ring) in enumerate(self.rings.items()):
            t, counters = ring.state()
            tensors.update({f"{i}.{k}": v.contiguous() for k, v in t.items()})
            rings.append({"tenant": tenant, **counters})
        return tensors, {"added": self.added, "hidden_size": self.hidden_size, "width": self.width, "rings": rings}

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Replace the contents with a `state()`; ValueError (contents untouched) if it does not fit."""
        if meta.get("hidden_size") != self.hidden_size or meta.get("width") != self.width:
            raise ValueError(f"buffer of hidden {meta.get('hidden_size')}, width {meta.get('width')} does not fit "
                             f"{self.hidden_size}/{self.width}")
        rings: collections.OrderedDict[str, TenantRing] = collections.OrderedDict()
        first = max(0, len(meta["rings"]) - self.max_tenants)  # the most recently fed tenants
        for j, r in enumerate(meta["rings"]):
            if j < first:
                continue
            ring_tensors = {k: tensors[f"{j}.{k}"] for k in ("hidden", "tokens", "targets", "stamps")}
            if int(r["size"]) > self.tenant_capacity:  # a smaller capacity now: the newest, oldest in slot 0
                keep = torch.argsort(ring_tensors["stamps"])[-self.tenant_capacity:]
                ring_tensors = {k: v[keep] for k, v in ring_tensors.items()}
                r = {**r, "size": len(keep), "slots": len(keep), "next": 0}
            elif int(r["slots"]) > self.tenant_capacity:  # not wrapped (slots 0..size-1 in order): fewer slots
                r = {**r, "slots": max(int(r["size"]), self.tenant_capacity)}
            rings[str(r["tenant"])] = TenantRing.restore(self.hidden_size, self.width, self.tenant_capacity,
                                                         ring_tensors, r)
        self.rings, self.added = rings, int(meta.get("added", 0))

    def sample(self, n: int) -> tuple[AdaptiveFeatures, Tensor] | None:
        """n samples (with replacement), tenants by size^(1-balance), recency-weighted inside each tenant."""
        rings = [r for r in self.rings.values() if r.size]
        if not rings or n <= 0:
            return None
        sizes = torch.tensor([float(r.size) for r in rings], dtype=torch.float64)
        tw = sizes ** (1.0 - self.tenant_balance)
        picks = torch.multinomial(tw / tw.sum(), n, replacement=True, generator=self._gen)
        counts = torch.bincount(picks, minlength=len(rings)).tolist()
        parts = []
        for ring, c in zip(rings, counts):
            if c:
                idx = torch.multinomial(ring.weights(self.half_life), c, replacement=True, generator=self._gen)
                parts.append(ring.take(idx))
        return _batch(parts)

    def newest(self, n: int) -> tuple[AdaptiveFeatures, Tensor] | None:
        """Up to n of the most recent samples over all tenants (newest per tenant, tenants pro rata)."""
        rings = [r for r in self.rings.values() if r.size]
        total = sum(r.size for r in rings)
        if not total:
            return None
        parts = []
        for r in rings:
            share = r.size if total <= n else max(1, round(n * r.size / total))
            parts.append(r.take(r.newest(share)))
        return _batch(parts)


def _batch(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[AdaptiveFeatures, Tensor]:
    hidden = torch.cat([p[0] for p in parts])
    tokens = torch.cat([p[1] for p in parts])
    targets = torch.cat([p[2] for p in parts])
    return AdaptiveFeatures(hidden, tokens), targets
