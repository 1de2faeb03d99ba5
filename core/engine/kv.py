"""A batched KV cache whose slots can be invalidated: how rejected drafts are rolled back per request.

Requests in a batch accept different numbers of drafts, so their caches cannot be cropped to one length.
Instead every cache slot carries a validity bit (the 2-D attention mask transformers already understands):
rejected drafts and padding become invalid slots ("holes"), the tail that no request uses is cropped, and
when compaction would free more than a ratio of the slots the cache is compacted by one gather into a
left-padded layout (padding alone never triggers it: it cannot be freed). Position ids are
tracked per request (number of valid tokens), so RoPE never sees the layout.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class BatchKV:
    """KV cache + validity mask for the requests currently in the batch (row i = request i)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache = DynamicCache()
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return int(self.valid.shape[0])

    @property
    def slots(self) -> int:
        return int(self.valid.shape[1])

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
            for layer in _layers(self.cache):  # slicing, not Cache.crop: its signature changed across 5.x
                layer.keys = layer.keys[:, :, :new_slots]
                layer.values = layer.values[:, :, :new_slots]
            self.valid = self.valid[:, :new_slots]

    # -- batch membership ---------------------------------------------------------------------------------------
    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished requests leave the batch)."""
        if rows.numel() == 0:
            self.__init__(self.device)  # type: ignore[misc]
            return
        self.cache.batch_select_indices(rows)
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
        mine, theirs = _layers(self.cache), _layers(other.cache)
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([_left_pad(a.keys, width), _left_pad(b.keys, width)], dim=0)
            a.values = torch.cat([_left_pad(a.values, width), _left_pad(b.values, width)], dim=0)
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
        order = torch.argsort(self.valid.to(torch.int8), dim=1, stable=True)[:, -width:]
        for layer in _layers(self.cache):
            idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = torch.gather(layer.keys, 2, idx)
            layer.values = torch.gather(layer.values, 2, idx)
        self.valid = torch.gather(self.valid, 1, order)


def _layers(cache: DynamicCache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("adaspec needs transformers>=5 DynamicCache with per-layer `keys`/`values`")
    return layers


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - t.shape[2]
    if pad == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], dim=2)


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - m.shape[1]
    if pad == 0:
        return m
    return torch.cat([m.new_zeros(m.shape[0], pad), m], dim=1)
