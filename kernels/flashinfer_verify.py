"""Rejection-sampling chain verification on CUDA via flashinfer, with the torch reference as fallback.

Why: flashinfer's `chain_speculative_sampling` does the accept test and the residual draw for a whole batch
in one fused kernel. It fits our contract only partly, so this wrapper uses it where it fits and otherwise
runs `rejection_verify_reference`:

* flashinfer missing, tensors not on CUDA, an empty batch, or an empty draft -> reference.
* draft_lens varying within the batch -> reference (flashinfer has no per-row draft length). A uniform
  length L < K is handled by slicing the first L drafts.
* a deterministic drafter (`draft_probs is None`) -> one-hot q is built for flashinfer, unless that tensor
  would be large (> `_MAX_ONE_HOT_ELEMENTS`), in which case the reference is cheaper.

Randomness: the engine draws `uniforms` from per-request generators so that results do not depend on
batching, and the reference is a deterministic function of them. Older flashinfer releases take
`uniform_samples`, and then ours are passed. Current flashinfer (>= 0.2) draws its own uniforms (Philox,
seeded from torch's CUDA generator), which breaks that per-request reproducibility, so it is used only when
the caller allows it (`allow_own_rng=True`, which dispatch passes under ADASPEC_KERNELS=triton). Either way
the flashinfer result is exact chain speculative sampling: it equals the reference in distribution, not
sample for sample (the two kernels consume uniforms differently).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import Tensor

from .backend import flashinfer_available
from .reference import rejection_verify_reference

__all__ = ["rejection_verify_flashinfer", "run_chain_sampler", "flashinfer_chain_sampler"]

_MAX_ONE_HOT_ELEMENTS = 1 << 26  # 256 MiB of float32


@functools.lru_cache(maxsize=None)
def flashinfer_chain_sampler() -> Callable[..., Any] | None:
    """flashinfer.sampling.chain_speculative_sampling, or None when flashinfer cannot be imported."""
    if not flashinfer_available():
        return None
    try:
        from flashinfer.sampling import chain_speculative_sampling
    except Exception:  # a broken CUDA/flashinfer install must not break the engine: use the reference
        return None
    return chain_speculative_sampling


def _takes_uniforms(fn: Callable[..., Any]) -> bool:
    try:
        return "uniform_samples" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def rejection_verify_flashinfer(
    draft: Tensor,
    draft_lens: Tensor,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    uniforms: Tensor,
    residual_uniforms: Tensor,
    *,
    allow_own_rng: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """`rejection_verify_reference` semantics, run by flashinfer where it fits (see the module docstring).

    allow_own_rng: let a flashinfer that ignores `uniforms` (>= 0.2, own RNG) run; otherwise use the reference.
    """
    fn = flashinfer_chain_sampler()
    B, K = draft.shape
    if fn is None or not target_probs.is_cuda or B == 0 or K == 0:
        return rejection_verify_reference(draft, draft_lens, target_probs, draft_probs, uniforms, residual_uniforms)
    if not (allow_own_rng or _takes_uniforms(fn)):
        return rejection_verify_reference(draft, draft_lens, target_probs, draft_probs, uniforms, residual_uniforms)
    return run_chain_sampler(fn, draft, draft_lens, target_probs, draft_probs, uniforms, residual_uniforms)


def run_chain_sampler(
    fn: Callable[..., Any],
    draft: Tensor,
    draft_lens: Tensor,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    uniforms: Tensor,
    residual_uniforms: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adapt our inputs to a flashinfer-style chain sampler `fn` and its outputs back (device-agnostic glue).

    Falls back to the reference where flashinfer's contract cannot express the batch (see module docstring).
    """
    B, K = draft.shape
    if B == 0 or K == 0:
        return rejection_verify_reference(draft, draft_lens, target_probs, draft_probs, uniforms, residual_uniforms)
    lo, hi = (int(x) for x in torch.aminmax(draft_lens))  # one host sync: flashinfer needs a uniform length
    V = target_probs.shape[-1]
    if lo != hi or not 0 < lo <= K or (draft_probs is None and B * lo * V > _MAX_ONE_HOT_ELEMENTS):
        return rejection_verify_reference(draft, draft_lens, target_probs, draft_probs, uniforms, residual_uniforms)
    L = lo
    tokens = draft[:, :L].to(torch.int32).contiguous()
    p = target_probs[:, : L + 1].float().contiguous()
    if draft_probs is None:
        q = torch.zeros(B, L, V, dtype=torch.float32, device=p.device)
        q.scatter_(-1, tokens.long()[..., None], 1.0)
    else:
        q = draft_probs[:, :L].float().contiguous()
    if _takes_uniforms(fn):  # flashinfer < 0.2: (draft_probs, draft_token_ids, uniform_samples, target_probs)
        u = torch.cat([uniforms[:, :L].float(), residual_uniforms.float()[:, None]], dim=1).contiguous()
        result = fn(q, tokens, u, p)
    else:
        result = fn(q, tokens, p)
    if isinstance(result, Tensor):  # the earliest releases return only output_token_ids, -1 after the emitted
        out_ids = result
        accepted = (out_ids != -1).sum(dim=1).long() - 1
    else:
        out_ids, accepted = result[0], result[2].long()
    next_token = out_ids.long().gather(1, accepted[:, None]).squeeze(1)
    return accepted, next_token, accepted + 1
