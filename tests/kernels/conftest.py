"""Kernel tests run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before the kernel modules are imported (triton.jit reads it when it wraps a
kernel), hence at conftest import time, before any test module is collected. ADASPEC_KERNELS defaults to
auto here; tests that go through dispatch set it explicitly with monkeypatch.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("ADASPEC_KERNELS", "auto")

import pytest  # noqa: E402

_HINT = "triton is not installed: `pip install triton` (set ADASPEC_SKIP_TRITON=1 to skip the Triton tests)"


def _kernel_modules_imported_too_early() -> list[str]:
    names = ("adaspec.kernels.triton_draft_head", "adaspec.kernels.triton_verify")
    return [n for n in names if n in sys.modules and "Interpreted" not in type(_first_kernel(sys.modules[n])).__name__]


def _first_kernel(module: object) -> object:
    return next(v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel"))


@pytest.fixture
def triton_kernels():
    """The Triton kernel modules, interpreted on CPU. Fails loudly (does not skip) when triton is missing."""
    if os.environ.get("ADASPEC_SKIP_TRITON") == "1":
        pytest.skip("ADASPEC_SKIP_TRITON=1")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.fail(_HINT, pytrace=False)
    early = _kernel_modules_imported_too_early()
    if early:
        pytest.fail(f"{early} were imported before TRITON_INTERPRET=1 was set; run tests/kernels separately")
    from adaspec.kernels import triton_draft_head, triton_verify

    return triton_draft_head, triton_verify
