#!/usr/bin/env bash
# Build the offline bundle for an air-gapped CUDA host that has torch (docs/gpu-runbook.md, "Offline bundle"):
# sglang 0.5.17 + its serving-path wheels (requirements/sglang-gpu-serving.txt), sglang-kernel without
# FlashAttention-3, flashinfer, adaspec's wheel (with the static head), the model, gpu_validate.sh -> parts of at
# most --part-mib MiB + MANIFEST.json (sha256s) + unpack.py/unpack.sh. A thin wrapper: every argument goes to
# `python -m adaspec.sglang_ext.bundle build` (--help lists them); --out DIR is required.
#   bash scripts/offline_bundle.sh --out /data/adaspec-bundle                      # downloads from PyPI
#   bash scripts/offline_bundle.sh --out B --wheel-dir W --skip-download --no-model # from wheels already in W
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m adaspec.sglang_ext.bundle build "$@"
