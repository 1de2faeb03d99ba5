#!/usr/bin/env bash
# Fresh machine -> ready: a venv with CPU torch, adaspec (editable) with test extras, and the real model.
# Idempotent: re-running skips what is already there. TORCH_SPEC overrides the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# torch first, pinned: a looser spec would pull a multi-GB CUDA build on a CPU machine.
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,kernels]"
# SGLang 0.5.17 (+ compose schema check) as test-only overlays for tests/test_sglang_*.py (SKIP_SGLANG=1 skips).
bash scripts/install_sglang_cpu.sh
.venv/bin/adaspec models fetch
