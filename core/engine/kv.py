"""A batched KV cache whose slots can be invalidated: how rejected drafts are rolled back per request.

Requests in a batch accept different numbers of drafts, so their caches cannot be cropped to one length.
Instead every cache slot carries a validity bit (the 2-D attention mask transformers already understands):
rejected drafts and padding become invalid slots ("holes"), the tail that no request uses is cropped, and
when compaction would free more than a ratio of the slots the cache is compacted by one gather into a
left-padded layout (padding alone never triggers it: it cannot be freed). Position ids are
tracked per request (number of valid tokens), so RoPE never sees the layout.

Requests that finish leave the batch by a row select, which is a copy of every kept row. The copy is
deferred: the mask and lengths shrink at once, the tensors only when they are next read -- by the next
forward, or folded into the next merge or compaction, which copy the kept rows anyway. Rows that finish on
different steps then cost one copy per admission instead of two (plain decoding, whose rows finish
together, never paid it: an empty select only resets).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class BatchKV:
    """KV cache + validity mask for the requests currently in the batch (row i = request i)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cache = DynamicCache()
        #: Rows of `_cache` still in the batch when a select is pending (None: every row).
        self._rows: torch.Tensor | None = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return int(self.valid.shape[0])

    @property
    def slots(self) -> int:
        return int(self.valid.shape[1])

    @property
    def cache(self) -> DynamicCache:
        """The cache the forward reads and extends, with any pending row select applied."""
        if self._rows is not None:
            rows, self._rows = self._rows, None
            for layer in _layers(self._cache):
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)
        return self._cache

    @cache.setter
    def cache(self, cache: DynamicCache) -> None:
        self._cache, self._rows = cache, None

    # -- one forward step ------------------------------------------------------------------------------------
    def step_inputs(self, chunk_lens: torch.Tensor, chunk_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask [B, slots + C] and position ids [B, C] for a right-padded chunk of new tokens."""
        ar = torch.arange(chunk_width, device=self.device)
        chunk_valid = ar.unsqueeze(0) < chunk_lens.unsqueeze(1)
        mask = torch.cat([self.valid, chunk_valid], dim=1).long()
        positions = self.lengths.unsqueeze(1) + ar.unsqueeze(0)
        return mask, positions

    def commit(self, keep: torch.Tensor, chunk_width: int) -> None:
        """After the forward appended C slots per row: keep the first keep[i] of row i's chunk, drop the rest."""
        ar = torch.arange(chunk_width, device=self.device)
        chunk_valid = ar.unsqueeze(0) < keep.unsqueeze(1)
        self.valid = torch.cat([self.valid, chunk_valid], dim=1)
        self.lengths = self.lengths + keep
        used = self.valid.any(dim=0).nonzero()
        new_slots = int(used[-1]) + 1 if used.numel() else 0
        if new_slots < self.slots:
            for layer in _layers(self._cache):  # slicing, not Cache.crop: its signature changed across 5.x
                layer.keys = layer.keys[:, :, :new_slots]
                layer.values = layer.values[:, :, :new_slots]
            self.valid = self.valid[:, :new_slots]

    # -- batch membership ---------------------------------------------------------------------------------------
    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished requests leave the batch); the tensors' copy is deferred."""
        if rows.numel() == 0:
            self.__init__(self.device)  # type: ignore[misc]
            return
        if rows.numel() == self.batch_size and bool((rows == torch.arange(self.batch_size)).all()):
            return
        self._rows = rows if self._rows is None else self._rows[rows]
        self.valid = self.valid[rows]
        self.lengths = self.lengths[rows]

    def merge(self, other: "BatchKV") -> None:
        """Append other's rows below ours, left-padding the shorter cache with invalid slots."""
        if other.batch_size == 0:
            return
        if self.batch_size == 0:
            self.cache, self.valid, self.lengths = other.cache, other.valid, other.lengths
            return
        width = max(self.slots, other.slots)
        n, rows = self.batch_size, self._rows
        self._rows = None
        for a, b in zip(_layers(self._cache), _layers(other.cache)):
            a.keys = _stack_left_padded(a.keys, rows, b.keys, n, width)
            a.values = _stack_left_padded(a.values, rows, b.values, n, width)
        self.valid = torch.cat([_left_pad_mask(self.valid, width), _left_pad_mask(other.valid, width)], dim=0)
        self.lengths = torch.cat([self.lengths, other.lengths])

    # -- compaction ---------------------------------------------------------------------------------------------
    def reclaimable_ratio(self) -> float:
        """Share of the slots a compaction would free (its width is the longest row's valid count): the holes
        beyond what the longest row needs. Padding that compaction cannot remove does not count."""
        if self.batch_size == 0 or self.slots == 0:
            return 0.0
        return 1.0 - int(self.lengths.max()) / self.slots

    def maybe_compact(self, ratio: float) -> bool:
        """Compact when more than `ratio` of the slots can be reclaimed (never for padding alone: a batch of
        prompts of different lengths would otherwise be gathered anew every step for nothing)."""
        if self.batch_size == 0 or self.reclaimable_ratio() <= ratio:
            return False
        self.compact()
        return True

    def compact(self) -> None:
        """Gather every row's valid slots into a left-padded layout of width max(lengths)."""
        width = int(self.lengths.max())
        # Stable sort puts invalid slots first and valid ones after, each group in original order.
        order = torch.argsort(self.valid.to(torch.int8), dim=1, stable=True)[:, -width:]  # [B, W]
        rows, self._rows = self._rows, None
        for layer in _layers(self._cache):
            if rows is None:
                idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys = torch.gather(layer.keys, 2, idx)
                layer.values = torch.gather(layer.values, 2, idx)
            else:  # the pending select and the gather in one indexing pass
                heads = torch.arange(layer.keys.shape[1], device=self.device)[None, :, None]  # [1, H, 1]
                r, o = rows[:, None, None], order[:, None, :]  # [B, 1, 1], [B, 1, W]
                layer.keys = layer.keys[r, heads, o]
                layer.values = layer.values[r, heads, o]
        self.valid = torch.gather(self.valid, 1, order)


def _layers(cache: DynamicCache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("adaspec needs transformers>=5 DynamicCache with per-layer `keys`/`values`")
    return layers


def _stack_left_padded(
    mine: torch.Tensor, rows: torch.Tensor | None, theirs: torch.Tensor, n: int, width: int
) -> torch.Tensor:
    """[n + m, H, width, D]: our kept rows (`rows` of `mine`, all when None) above theirs, each left-padded
    with zeros to `width`, written once into one new tensor (no intermediate padded or selected copies)."""
    m, H, _, D = theirs.shape
    out = mine.new_empty(n + m, H, width, D)
    for lo, src, sel in ((0, mine, rows), (n, theirs, None)):
        count = n if lo == 0 else m
        pad = width - src.shape[2]
        dst = out[lo : lo + count]
        if pad:
            dst[:, :, :pad].zero_()
            dst[:, :, pad:] = src if sel is None else src.index_select(0, sel)
        elif sel is None:
            dst.copy_(src)
        else:
            torch.index_select(src, 0, sel, out=dst)
    return out


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - m.shape[1]
    if pad == 0:
        return m
    return torch.cat([m.new_zeros(m.shape[0], pad), m], dim=1)
