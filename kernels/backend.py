"""Which kernel backend is allowed and available: env parsing and import probes, with no triton import.

Kept apart from the kernels so that `adaspec.kernels.dispatch` imports on machines without triton or CUDA; the
Triton modules are only imported once a Triton path has actually been chosen.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

KernelMode = Literal["torch", "triton", "auto"]
_MODES: tuple[str, ...] = ("torch", "triton", "auto")

TRITON_MISSING = "triton is not installed: `pip install triton` (or `pip install adaspec[kernels]`)"


def kernel_mode() -> KernelMode:
    """The backend forced by `ADASPEC_KERNELS` (torch | triton | auto; default auto), read on every call."""
    mode = os.environ.get("ADASPEC_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"ADASPEC_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read at kernel definition)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether `import triton` can succeed (probed without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def flashinfer_available() -> bool:
    """Whether `import flashinfer` can succeed (probed without importing it)."""
    return importlib.util.find_spec("flashinfer") is not None


def require_triton() -> None:
    """Fail loudly (with the install hint) when a Triton path was asked for but triton is missing."""
    if not triton_available():
        raise ImportError(TRITON_MISSING)


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on tensor `t`: CUDA tensors, or CPU tensors under the interpreter."""
    return t.is_cuda or (interpret_mode() and t.device.type == "cpu")
