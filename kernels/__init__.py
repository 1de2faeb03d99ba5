"""Drafting and verification kernels (Triton / flashinfer on CUDA) with exact torch references.

Import-safe without triton or CUDA: kernel modules load lazily when `dispatch` picks them.
"""

from .backend import kernel_mode
from .dispatch import draft_topk, greedy_verify, rejection_verify
from .reference import draft_topk_reference, greedy_verify_reference, rejection_verify_reference

__all__ = [
    "draft_topk",
    "greedy_verify",
    "rejection_verify",
    "draft_topk_reference",
    "greedy_verify_reference",
    "rejection_verify_reference",
    "kernel_mode",
]
