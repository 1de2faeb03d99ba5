"""One-launch greedy chain verification for a whole batch (Triton).

Why a kernel: on GPU the torch version is ~6 small launches (compare, mask, cumprod, sum, gather, add) per
step, each paying launch latency that rivals the work; this does the same in one launch with no host sync.
Semantics are exactly those of `greedy_verify_reference`; draft_lens are clamped to [0, K] on device
(the reference validates them instead, since checking would force a sync here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["greedy_verify_triton"]


@triton.jit
def _greedy_verify_kernel(
    draft_ptr, lens_ptr, tgt_ptr, acc_ptr, next_ptr, keep_ptr,
    B, K,
    stride_db, stride_dk, stride_l, stride_tb, stride_tk,
    BLOCK_B: tl.constexpr, K1_PAD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    j = tl.arange(0, K1_PAD)
    lens = tl.load(lens_ptr + rows64 * stride_l, mask=row_ok, other=0).to(tl.int32)
    lens = tl.minimum(tl.maximum(lens, 0), K)
    d = tl.load(
        draft_ptr + rows64[:, None] * stride_db + j[None, :] * stride_dk,
        mask=row_ok[:, None] & (j[None, :] < K), other=-1,
    ).to(tl.int64)
    t = tl.load(
        tgt_ptr + rows64[:, None] * stride_tb + j[None, :] * stride_tk,
        mask=row_ok[:, None] & (j[None, :] <= K), other=-1,
    ).to(tl.int64)
    miss = (j[None, :] < lens[:, None]) & (d != t)
    first_miss = tl.min(tl.where(miss, j[None, :], K1_PAD), 1)
    accepted = tl.minimum(first_miss, lens)
    nxt = tl.sum(tl.where(j[None, :] == accepted[:, None], t, 0), 1)
    tl.store(acc_ptr + rows64, accepted.to(tl.int64), mask=row_ok)
    tl.store(next_ptr + rows64, nxt, mask=row_ok)
    tl.store(keep_ptr + rows64, (accepted + 1).to(tl.int64), mask=row_ok)


def greedy_verify_triton(draft: Tensor, draft_lens: Tensor, target_argmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton version of `greedy_verify_reference`: (accepted, next_token, keep_len), int64 [B] each."""
    if draft.dim() != 2:
        raise ValueError(f"draft must be [B, K], got {tuple(draft.shape)}")
    B, K = draft.shape
    if tuple(draft_lens.shape) != (B,) or tuple(target_argmax.shape) != (B, K + 1):
        raise ValueError(
            f"need draft_lens [{B}] and target_argmax [{B}, {K + 1}], "
            f"got {tuple(draft_lens.shape)} and {tuple(target_argmax.shape)}"
        )
    outs = tuple(torch.empty(B, dtype=torch.int64, device=draft.device) for _ in range(3))
    if B == 0:
        return outs  # type: ignore[return-value]
    block_b = min(128, max(16, triton.next_power_of_2(B)))
    k1_pad = max(2, triton.next_power_of_2(K + 1))
    _greedy_verify_kernel[(triton.cdiv(B, block_b),)](
        draft, draft_lens, target_argmax, *outs,
        B, K,
        draft.stride(0), draft.stride(1), draft_lens.stride(0), target_argmax.stride(0), target_argmax.stride(1),
        BLOCK_B=block_b, K1_PAD=k1_pad, num_warps=4,
    )
    return outs  # type: ignore[return-value]
