"""Ragged verify: a step's chunks of different lengths packed into one row for the linear layers.

With right-padding, one request's long draft makes every row of the step pay its width: on this CPU a
padded token costs what a real one does (~3-4 ms in the projections and MLP of the 135M target), so a batch
where two requests draft nothing and two draft six pays 28 tokens for 16. Here the step's real tokens are
packed into a [1, T] input, so every layer's projections, MLP and the LM head run on T tokens only; only the
attention is padded, per request over its own rows of the batch KV cache (its cost per token is a small
share of the layer's at these context lengths), by an attention function registered through transformers'
`AttentionInterface`. The cache layout, the validity mask and `BatchKV.commit` are unchanged, so the engine
can choose padded or ragged per step and the two mix freely.

The packed row is filled up to a multiple of `PACK_MULTIPLE` tokens with filler tokens placed in padding
slots of the chunk (masked from every real query, dropped by the commit): on this CPU's GEMM kernels a step of
7 tokens took 157 ms and one of 8 took 121 (batch 4, 200-token KV; 11: 169 vs 12: 140), so the filler is
cheaper than the ragged length it rounds.

A forward without a `RaggedChunk` (any other caller of the model: training, `bench tau`) runs plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "adaspec_ragged"
#: The packed row's length is rounded up to a multiple of this with filler tokens (see the module docstring).
PACK_MULTIPLE = 4
#: The forward keyword that carries a step's `RaggedChunk` down to the attention function.
KWARG = "adaspec_ragged"


@dataclass
class RaggedChunk:
    """Where each packed token sits in the padded batch, and what it may attend to."""

    rows: torch.Tensor  # [T + F] the request (cache row) of each packed token, the F fillers last
    offs: torch.Tensor  # [T + F] its offset inside that request's chunk (a filler's: a padding slot)
    batch: int  # B
    width: int  # W: the longest chunk
    mask: torch.Tensor  # [B, 1, W, S + W] bool: the valid cache slots, then causal inside the row's chunk
    cache: object  # the batch's DynamicCache: each layer appends its padded [B, H, W, d] chunk
    real: int  # T: the real tokens (the packed row's first T)

    @classmethod
    def build(cls, lens: torch.Tensor, valid: torch.Tensor, cache: object,
              multiple: int = PACK_MULTIPLE) -> "RaggedChunk":
        """lens [B] chunk lengths (>= 1), valid [B, S] the cache's validity mask; the real tokens are packed
        row after row, then fillers round the packed length up to `multiple`."""
        B, W = int(lens.shape[0]), int(lens.max())
        device = valid.device
        lens = lens.to(device)
        T = int(lens.sum())
        fill = -T % max(1, multiple)
        while B * W - T < fill:  # too few padding slots for the fillers: one column more
            W += 1
        ar = torch.arange(W, device=device)
        real = ar[None, :] < lens[:, None]  # [B, W]
        grid_rows = torch.arange(B, device=device)[:, None].expand(B, W)
        grid_offs = ar[None, :].expand(B, W)
        rows, offs = grid_rows[real], grid_offs[real]  # [T], row-major: each request's chunk in order
        if fill:
            rows = torch.cat([rows, grid_rows[~real][:fill]])
            offs = torch.cat([offs, grid_offs[~real][:fill]])
        causal = (ar[None, :] <= ar[:, None])[None] & real[:, None, :]  # [B, W, W]
        mask = torch.cat([valid[:, None, :].expand(B, W, valid.shape[1]), causal], dim=2)[:, None]
        return cls(rows, offs, B, W, mask, cache, T)

    @property
    def fillers(self) -> int:
        """Filler tokens after the real ones in the packed row."""
        return int(self.rows.shape[0]) - self.real

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[T, ...] per packed token -> [B, W, ...] right-padded with zeros."""
        out = packed.new_zeros(self.batch, self.width, *packed.shape[1:])
        out[self.rows, self.offs] = packed
        return out


def ragged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, d], key/value [1, Hkv, T, d] (rotary applied; the model ran without a cache): the
    chunk's keys join the batch cache padded, attention runs padded, the output [1, T, Hq, d] is packed."""
    chunk: RaggedChunk | None = kwargs.pop(KWARG, None)
    if chunk is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    k = chunk.unpack(key[0].transpose(0, 1)).transpose(1, 2)  # [B, Hkv, W, d]
    v = chunk.unpack(value[0].transpose(0, 1)).transpose(1, 2)
    keys, values = chunk.cache.update(k, v, module.layer_idx)  # [B, Hkv, S + W, d]
    q = chunk.unpack(query[0].transpose(0, 1)).transpose(1, 2)  # [B, Hq, W, d]
    out, _ = sdpa_attention_forward(module, q, keys, values, chunk.mask, **kwargs)  # [B, W, Hq, d]
    return out[chunk.rows, chunk.offs].unsqueeze(0), None


AttentionInterface.register(ATTENTION, ragged_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def enable(model: torch.nn.Module) -> bool:
    """Route the model's attention through `ragged_attention` (which is SDPA without a chunk); False, and the
    model untouched, where its attention is not SDPA (eager or flash kernels: the engine stays padded)."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION:
        return True
    if current != "sdpa":
        return False
    config._attn_implementation = ATTENTION
    return True
