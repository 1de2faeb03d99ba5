"""Torch reference implementations of the drafting and verification kernels.

These are the oracle the Triton/flashinfer kernels are tested against, and they are what the engine runs
on CPU (or whenever no kernel applies), so they are exact, fully vectorised over the batch (no Python loop
over rows) and written to avoid materialising more than one [B, V] float32 buffer at a time where possible.

Conventions shared with the kernels (the engine relies on them):

* Draft top-k: probabilities are softmax over the FULL vocabulary; the k ids are ordered by descending
  probability, ties broken by the lower id.
* Verification: row i verified the input [pending, d_0 .. d_{L_i-1}] with L_i = draft_lens[i] <= K;
  entries of `draft` at positions >= L_i are padding (any value). `accepted[i]` counts the leading accepted
  drafts, `next_token[i]` is the target's token after them (correction or bonus), and
  `keep_len[i] = accepted[i] + 1` is how many KV positions of this step's input survive (the pending token
  plus the accepted drafts).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "draft_topk_reference",
    "greedy_verify_reference",
    "rejection_verify_reference",
    "inverse_cdf_sample",
    "topk_lowest_id",
]

# Rows of a non-float32 weight converted to float32 at a time: bounds the temporary copy (a 152k x 4096
# bf16 head would otherwise need a 2.5 GB float32 copy just to compute logits).
_WEIGHT_CHUNK_ROWS = 8192


def _check_draft_args(hidden: Tensor, weight: Tensor, k: int, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [B, d] and weight [V, d], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}")
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must be in [1, V={weight.shape[0]}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _logits_fp32(hidden: Tensor, weight: Tensor) -> Tensor:
    """hidden @ weight.T computed in float32 (low-precision weights are upcast in row chunks)."""
    h = hidden.float()
    if weight.dtype == torch.float32:
        return h @ weight.T
    V = weight.shape[0]
    out = torch.empty(h.shape[0], V, dtype=torch.float32, device=h.device)
    for start in range(0, V, _WEIGHT_CHUNK_ROWS):
        stop = min(start + _WEIGHT_CHUNK_ROWS, V)
        torch.matmul(h, weight[start:stop].float().T, out=out[:, start:stop])
    return out


def topk_lowest_id(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of `scores` [B, V] by descending value, ties broken by the lower index.

    `torch.topk` leaves the order of equal values unspecified (and which of several equal values at the
    k-th place get in); the kernels break ties by lower id, so the reference must too. The common case (no
    tie at the k-th value) costs one extra comparison pass; the tie case picks the lowest tied ids.
    """
    B, V = scores.shape
    vals, idx = scores.topk(k, dim=-1)
    thr = vals[:, k - 1 : k]
    ge = scores >= thr
    if not bool((ge.sum(-1) == k).all()):
        gt = scores > thr
        eq = scores == thr
        need = k - gt.sum(-1, keepdim=True)
        sel = gt | (eq & (eq.cumsum(-1) <= need))
        idx = sel.nonzero()[:, 1].view(B, k)  # row-major nonzero: ascending ids per row
    idx, _ = idx.sort(dim=-1)  # ascending id, so a stable sort keeps lower ids first among equal values
    v = scores.gather(-1, idx)
    order = v.sort(dim=-1, descending=True, stable=True).indices
    return idx.gather(-1, order), v.gather(-1, order)


def draft_topk_reference(
    hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Top-k ids [B, k] (int64) and their probabilities [B, k] (float32) of softmax(hidden @ weight.T / T).

    The softmax is over the full vocabulary (so the probabilities are the drafter's real confidences, not
    renormalised over the k candidates).
    """
    _check_draft_args(hidden, weight, k, temperature)
    logits = _logits_fp32(hidden, weight)
    if temperature != 1.0:
        logits.div_(temperature)
    probs = torch.softmax(logits, dim=-1)
    del logits
    return topk_lowest_id(probs, k)


def _check_verify_args(draft: Tensor, draft_lens: Tensor, n_cols: int, other: Tensor, name: str) -> tuple[int, int]:
    if draft.dim() != 2:
        raise ValueError(f"draft must be [B, K], got {tuple(draft.shape)}")
    B, K = draft.shape
    if draft_lens.shape != (B,):
        raise ValueError(f"draft_lens must be [{B}], got {tuple(draft_lens.shape)}")
    if other.shape[0] != B or other.shape[1] != n_cols:
        raise ValueError(f"{name} must be [{B}, {n_cols}, ...], got {tuple(other.shape)}")
    if B and (bool((draft_lens < 0).any()) or bool((draft_lens > K).any())):
        raise ValueError(f"draft_lens must lie in [0, K={K}], got {draft_lens.tolist()}")
    return B, K


def greedy_verify_reference(draft: Tensor, draft_lens: Tensor, target_argmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy chain verification: accept the longest prefix of the draft that equals the target's argmax.

    Returns (accepted, next_token, keep_len), each int64 [B]; see the module docstring for the semantics.
    """
    B, K = _check_verify_args(draft, draft_lens, draft.shape[1] + 1, target_argmax, "target_argmax")
    j = torch.arange(K, device=draft.device)
    match = (draft == target_argmax[:, :K]) & (j < draft_lens[:, None])
    accepted = match.long().cumprod(dim=-1).sum(dim=-1)
    next_token = target_argmax.gather(1, accepted[:, None]).squeeze(1).long()
    return accepted, next_token, accepted + 1


def inverse_cdf_sample(dist: Tensor, u: Tensor) -> Tensor:
    """Sample one index per row of the unnormalised, non-negative `dist` [B, V] with uniforms `u` [B] in [0, 1).

    Definition: the smallest index i with cumsum(dist)[i] > u * total, total = sum(dist) (cumulative sums in
    float64). Zero-mass indices are never returned for a row with positive total. Should rounding leave no
    such index (u * total == total), the largest index with positive mass is returned; an all-zero row
    returns V - 1.
    """
    V = dist.shape[-1]
    cs = dist.double().cumsum(dim=-1)
    x = u.double()[:, None] * cs[:, -1:]
    idx = torch.searchsorted(cs, x, right=True).squeeze(-1)
    last_pos = (V - 1) - (dist > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
    return torch.where(idx >= V, last_pos, idx)


def rejection_verify_reference(
    draft: Tensor,
    draft_lens: Tensor,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    uniforms: Tensor,
    residual_uniforms: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact chain speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Draft d_j (j < L_i) is accepted iff uniforms[i, j] < p_j(d_j) / q_j(d_j), stopping at the first
    rejection. At a rejection at j the next token is drawn from the residual max(0, p_j - q_j) (with a
    point-mass q, i.e. `draft_probs is None`, that is p_j with d_j zeroed); when all L_i drafts are accepted
    the bonus is drawn from p_{L_i}. Draws use `inverse_cdf_sample` with residual_uniforms[i]. If the
    residual has zero mass (p_j == q_j up to rounding, so the rejection was a rounding accident) the draw
    falls back to p_j. The emitted tokens are then distributed exactly as the target would sample them.

    target_probs: [B, K+1, V]; draft_probs: [B, K, V] or None; uniforms: [B, K]; residual_uniforms: [B].
    Returns (accepted, next_token, keep_len), int64 [B] each.
    """
    B, K = _check_verify_args(draft, draft_lens, draft.shape[1] + 1, target_probs, "target_probs")
    V = target_probs.shape[-1]
    if draft_probs is not None and tuple(draft_probs.shape) != (B, K, V):
        raise ValueError(f"draft_probs must be [{B}, {K}, {V}], got {tuple(draft_probs.shape)}")
    if tuple(uniforms.shape) != (B, K) or tuple(residual_uniforms.shape) != (B,):
        raise ValueError(f"uniforms must be [{B}, {K}] and residual_uniforms [{B}]")
    device = draft.device
    j = torch.arange(K, device=device)
    in_chain = j < draft_lens[:, None]
    if B and K and bool(((draft < 0) | (draft >= V))[in_chain].any()):
        raise ValueError("draft ids within draft_lens must lie in [0, V)")
    tok = torch.where(in_chain, draft, 0).long()  # padding positions gather a harmless id
    p = target_probs if target_probs.dtype == torch.float32 else target_probs.float()
    p_d = p[:, :K].gather(-1, tok[..., None]).squeeze(-1)
    if draft_probs is None:
        q_d = torch.ones_like(p_d)
    else:
        q_d = draft_probs.gather(-1, tok[..., None]).squeeze(-1).float()
    accept = (uniforms.float() < p_d / q_d) & in_chain  # q_d == 0 < p_d gives inf: accept; 0/0 is nan: reject
    accepted = accept.long().cumprod(dim=-1).sum(dim=-1)

    rows = torch.arange(B, device=device)
    dist = p[rows, accepted]  # [B, V] copy: p_j at the rejection (or p_L for the bonus)
    if K:
        rejected = accepted < draft_lens
        pos = accepted.clamp(max=K - 1)
        if draft_probs is None:
            residual = dist.clone()
            residual[rows, tok[rows, pos]] = 0.0
        else:
            residual = (dist - draft_probs[rows, pos].float()).clamp_(min=0.0)
        use_residual = rejected & (residual.sum(dim=-1) > 0)
        dist = torch.where(use_residual[:, None], residual, dist)
    next_token = inverse_cdf_sample(dist, residual_uniforms)
    return accepted, next_token, accepted + 1
