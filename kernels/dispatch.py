"""Public entry points: pick the Triton/flashinfer kernel or the torch reference per call.

Choice (env `ADASPEC_KERNELS`, read on every call):
* `torch`: always the reference.
* `auto` (default): CUDA tensors use the kernel when its package imports (triton for draft_topk and
  greedy_verify); everything else, including CPU tensors under the Triton interpreter, uses the reference
  (the interpreter is far slower than torch). rejection_verify uses flashinfer on CUDA only if the installed
  flashinfer consumes our uniforms (older releases), keeping results a function of the per-request uniforms.
* `triton`: the Triton kernel, also on CPU tensors when TRITON_INTERPRET=1 (how the tests run it); it raises
  if triton is missing or the tensors cannot run it. rejection_verify has no Triton kernel: on CUDA it uses
  flashinfer even when flashinfer draws its own random numbers (exact in distribution, not reproducible from
  `uniforms`); the flashinfer wrapper falls back to the reference wherever flashinfer does not fit.

Kernel modules are imported lazily so that this module imports without triton. `adaspec.kernels` is a namespace
package (no __init__.py): see the note at `package-dir` in pyproject.toml.
"""

from __future__ import annotations

from torch import Tensor

from .backend import kernel_mode, require_triton, triton_available, triton_runs_on
from .reference import draft_topk_reference, greedy_verify_reference, rejection_verify_reference

__all__ = ["draft_topk", "greedy_verify", "rejection_verify"]

_TRITON_MAX_K = 32  # mirrors triton_draft_head.MAX_K without importing triton


def _use_triton(t: Tensor, what: str) -> bool:
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "auto":
        return t.is_cuda and triton_available()
    require_triton()
    if not triton_runs_on(t):
        raise RuntimeError(
            f"ADASPEC_KERNELS=triton but {what} got tensors on {t.device}: Triton needs CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


def draft_topk(hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Top-k ids [B, k] (int64) and full-vocab softmax probabilities [B, k] (float32) of hidden @ weight.T / T."""
    if _use_triton(hidden, "draft_topk"):
        if k > _TRITON_MAX_K and kernel_mode() == "auto":
            return draft_topk_reference(hidden, weight, k, temperature)
        from .triton_draft_head import draft_topk_triton

        return draft_topk_triton(hidden, weight, k, temperature)
    return draft_topk_reference(hidden, weight, k, temperature)


def greedy_verify(draft: Tensor, draft_lens: Tensor, target_argmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy chain verification: (accepted, next_token, keep_len), int64 [B] each."""
    if _use_triton(draft, "greedy_verify"):
        from .triton_verify import greedy_verify_triton

        return greedy_verify_triton(draft, draft_lens, target_argmax)
    return greedy_verify_reference(draft, draft_lens, target_argmax)


def rejection_verify(
    draft: Tensor,
    draft_lens: Tensor,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    uniforms: Tensor,
    residual_uniforms: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact chain speculative sampling: (accepted, next_token, keep_len), int64 [B] each.

    Except under ADASPEC_KERNELS=triton with a current flashinfer on CUDA (own RNG, see `flashinfer_verify`),
    the result is a deterministic function of `uniforms` / `residual_uniforms`.
    """
    mode = kernel_mode()
    if mode != "torch" and target_probs.is_cuda:
        from .flashinfer_verify import rejection_verify_flashinfer

        return rejection_verify_flashinfer(
            draft, draft_lens, target_probs, draft_probs, uniforms, residual_uniforms, allow_own_rng=mode == "triton"
        )
    return rejection_verify_reference(draft, draft_lens, target_probs, draft_probs, uniforms, residual_uniforms)
