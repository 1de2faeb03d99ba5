#!/usr/bin/env bash
# Install SGLang 0.5.17 (no deps) plus the pure-Python packages its control-plane modules import into the
# overlay .venv/sglang-cpu, for the CPU tests of the SGLang plugin (tests/test_sglang_*.py). Idempotent:
# skipped while the overlay's stamp matches requirements/sglang-cpu.txt. SKIP_SGLANG=1 skips it (the
# plugin tests then skip with that reason). Prints how long the install took.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ=requirements/sglang-cpu.txt
DEST=.venv/sglang-cpu
if [ "${SKIP_SGLANG:-0}" = "1" ]; then echo "sglang overlay: skipped (SKIP_SGLANG=1)"; exit 0; fi
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ -f "$DEST/.adaspec-stamp" ] && [ "$(cat "$DEST/.adaspec-stamp")" = "$want" ]; then exit 0; fi
start=$(date +%s)
rm -rf "$DEST.tmp"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$DEST.tmp" -r "$REQ"
echo "$want" > "$DEST.tmp/.adaspec-stamp"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "sglang overlay: installed in $(( $(date +%s) - start ))s ($DEST)"
