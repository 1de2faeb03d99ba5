"""Fused draft LM head: hidden [B, d] x W [V, d] -> top-k ids and full-vocabulary softmax probabilities.

Why fused: a draft head runs every step, and its [B, V] logits (V up to 152k) would cost a write and a
read of B*V floats plus a separate softmax and top-k launch. Here the logits live only in registers.

Two passes:
1. `_partial_kernel`, grid (row blocks, vocab splits): each program owns BLOCK_B rows and a contiguous run
   of BLOCK_V-wide vocabulary tiles. Per tile it computes the logits with tl.dot (fp32 accumulation),
   updates a running max / sum-exp (online softmax) and, only when some row's tile maximum beats that row's
   current k-th best, merges the tile into a running top-k. It writes, per (row, split), the max, the
   sum-exp and k candidate (logit, id) pairs.
2. `_merge_kernel`, one program per row: combines the per-split max / sum-exp into the global softmax
   normaliser and picks the top k of the splits' candidates.

Ties are broken by the lower vocabulary id everywhere, matching `draft_topk_reference`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import interpret_mode
from .reference import _check_draft_args

__all__ = ["draft_topk_triton", "MAX_K"]

#: Largest k the kernel is built for (the top-k lives in registers, unrolled k times).
MAX_K = 32
_BIG_ID = 2**31 - 1
_MAX_MERGE_CANDIDATES = 4096  # splits * padded k, read by one merge program


@triton.jit
def _partial_kernel(
    h_ptr, w_ptr, cand_val_ptr, cand_id_ptr, m_ptr, s_ptr,
    B, V, D, inv_temp, n_tiles, tiles_per_split, n_splits,
    stride_hb, stride_hd, stride_wv, stride_wd,
    K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, BIG_ID: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    kcol = tl.arange(0, K_PAD)
    run_val = tl.full([BLOCK_B, K_PAD], float("-inf"), tl.float32)
    run_id = tl.full([BLOCK_B, K_PAD], BIG_ID, tl.int32)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_B], tl.float32)

    tile_start = pid_s * tiles_per_split
    tile_stop = tl.minimum(tile_start + tiles_per_split, n_tiles)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hb
    for tile in range(tile_start, tile_stop):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
        acc = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            h = tl.load(h_rows + ds[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_rows + ds[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(w), acc)
        logits = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))

        # Online softmax statistics. Every tile has at least one valid column, so m is finite after it.
        tile_max = tl.max(logits, 1)
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m = m_new

        # Running top-k: earlier tiles have lower ids, so a tile value only gets in if strictly greater.
        kth = tl.min(tl.where(kcol[None, :] < K, run_val, float("inf")), 1)
        improves = row_ok & (tile_max > kth)
        if tl.max(improves.to(tl.int32), 0) > 0:
            rem = logits
            new_val = tl.full([BLOCK_B, K_PAD], float("-inf"), tl.float32)
            new_id = tl.full([BLOCK_B, K_PAD], BIG_ID, tl.int32)
            for r in tl.static_range(K):
                b_max = tl.max(rem, 1)
                b_id = tl.min(tl.where(rem == b_max[:, None], cols[None, :], BIG_ID), 1)
                a_max = tl.max(run_val, 1)
                a_id = tl.min(tl.where(run_val == a_max[:, None], run_id, BIG_ID), 1)
                take_a = a_max >= b_max
                pick_val = tl.where(take_a, a_max, b_max)
                pick_id = tl.where(take_a, a_id, b_id)
                new_val = tl.where(kcol[None, :] == r, pick_val[:, None], new_val)
                new_id = tl.where(kcol[None, :] == r, pick_id[:, None], new_id)
                run_val = tl.where(take_a[:, None] & (run_id == a_id[:, None]), float("-inf"), run_val)
                rem = tl.where((b_id[:, None] == cols[None, :]) & (take_a == 0)[:, None], float("-inf"), rem)
            run_val = new_val
            run_id = new_id

    out = rows.to(tl.int64) * n_splits + pid_s
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    cand = out[:, None] * K_PAD + kcol[None, :]
    tl.store(cand_val_ptr + cand, run_val, mask=row_ok[:, None])
    tl.store(cand_id_ptr + cand, run_id, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(
    cand_val_ptr, cand_id_ptr, m_ptr, s_ptr, out_id_ptr, out_p_ptr, n_splits,
    K: tl.constexpr, K_PAD: tl.constexpr, S_PAD: tl.constexpr, BIG_ID: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, S_PAD)
    sp_ok = sp < n_splits
    ms = tl.load(m_ptr + row * n_splits + sp, mask=sp_ok, other=float("-inf"))
    ss = tl.load(s_ptr + row * n_splits + sp, mask=sp_ok, other=0.0)
    m = tl.max(ms, 0)
    total = tl.sum(tl.where(sp_ok, ss * tl.exp(ms - m), 0.0), 0)

    c = tl.arange(0, S_PAD * K_PAD)
    c_ok = c < n_splits * K_PAD
    base = row * n_splits * K_PAD
    vals = tl.load(cand_val_ptr + base + c, mask=c_ok, other=float("-inf"))
    ids = tl.load(cand_id_ptr + base + c, mask=c_ok, other=BIG_ID)
    for r in tl.static_range(K):
        v_max = tl.max(vals, 0)
        v_id = tl.min(tl.where(vals == v_max, ids, BIG_ID), 0)
        tl.store(out_id_ptr + row * K + r, v_id.to(tl.int64))
        tl.store(out_p_ptr + row * K + r, tl.exp(v_max - m) / total)
        vals = tl.where(ids == v_id, float("-inf"), vals)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _choose_config(B: int, V: int, D: int, device: torch.device, upcast: bool) -> dict[str, int]:
    """Tile sizes and vocabulary split count (heuristic; the interpreter favours few, wide tiles)."""
    block_b = min(64, max(16, triton.next_power_of_2(B)))
    if device.type != "cuda":  # interpreter: per-op overhead dominates, so use wide tiles and few programs
        block_v, block_d, target_programs, num_warps = 1024, min(128, max(16, triton.next_power_of_2(D))), 8, 4
    else:  # BLOCK_V=64 keeps sm_90 builds free of register spills for k <= 8 (checked with cuobjdump)
        block_v = 64
        block_d = 32 if upcast else 64
        num_warps = 8 if block_b == 64 else 4
        target_programs = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    n_tiles = triton.cdiv(V, block_v)
    row_blocks = triton.cdiv(B, block_b)
    splits = max(1, min(n_tiles, triton.cdiv(target_programs, row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)  # every split owns at least one tile
    return dict(
        block_b=block_b, block_v=block_v, block_d=block_d, num_warps=num_warps,
        n_tiles=n_tiles, row_blocks=row_blocks, splits=splits, tiles_per_split=tiles_per_split,
    )


def draft_topk_triton(
    hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Triton version of `draft_topk_reference` (same signature and results up to fp32 rounding).

    Inputs may be float32, bfloat16 or float16 (accumulation is float32). k <= MAX_K.
    """
    _check_draft_args(hidden, weight, k, temperature)
    if k > MAX_K:
        raise ValueError(f"draft_topk_triton supports k <= {MAX_K}, got {k}")
    for t in (hidden, weight):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {t.dtype} (float32, bfloat16 or float16)")
    if hidden.device != weight.device:
        raise ValueError(f"hidden on {hidden.device} but weight on {weight.device}")
    B, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    ids = torch.empty(B, k, dtype=torch.int64, device=device)
    probs = torch.empty(B, k, dtype=torch.float32, device=device)
    if B == 0:
        return ids, probs
    # The interpreter's bf16 tl.dot is wrong (numpy has no bf16), and fp32 must not silently use TF32:
    # both cases multiply exact fp32 upcasts with IEEE precision (bf16/fp16 products are exact in fp32).
    upcast = interpret_mode() or hidden.dtype != weight.dtype or hidden.dtype == torch.float32
    cfg = _choose_config(B, V, D, device, upcast)
    k_pad = max(2, triton.next_power_of_2(k))
    splits = cfg["splits"]
    while triton.next_power_of_2(splits) * k_pad > _MAX_MERGE_CANDIDATES:  # keep the merge in registers
        cfg["tiles_per_split"] *= 2
        splits = triton.cdiv(cfg["n_tiles"], cfg["tiles_per_split"])
    cand_val = torch.empty(B * splits * k_pad, dtype=torch.float32, device=device)
    cand_id = torch.empty(B * splits * k_pad, dtype=torch.int32, device=device)
    m = torch.empty(B * splits, dtype=torch.float32, device=device)
    s = torch.empty(B * splits, dtype=torch.float32, device=device)

    _partial_kernel[(cfg["row_blocks"], splits)](
        hidden, weight, cand_val, cand_id, m, s,
        B, V, D, 1.0 / float(temperature), cfg["n_tiles"], cfg["tiles_per_split"], splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        K=k, K_PAD=k_pad, BLOCK_B=cfg["block_b"], BLOCK_V=cfg["block_v"], BLOCK_D=cfg["block_d"],
        UPCAST=upcast, BIG_ID=_BIG_ID, num_warps=cfg["num_warps"],
    )
    _merge_kernel[(B,)](
        cand_val, cand_id, m, s, ids, probs, splits,
        K=k, K_PAD=k_pad, S_PAD=max(2, triton.next_power_of_2(splits)), BIG_ID=_BIG_ID, num_warps=4,
    )
    return ids, probs
