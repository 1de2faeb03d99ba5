#!/usr/bin/env bash
# Test-only overlays for the SGLang plugin's CPU tests, each installed with --no-deps from a pinned list:
#   .venv/sglang-cpu     <- requirements/sglang-cpu.txt    (SGLang 0.5.17 + what its control-plane modules import)
#   .venv/compose-check  <- requirements/compose-check.txt (compose.yaml schema validation)
# They are put on PYTHONPATH only by the subprocesses the tests start, never in the venv itself (SGLang pins
# transformers 5.12.1; adaspec runs the newest 5.x). Idempotent: an overlay whose stamp matches its list is kept.
# SKIP_SGLANG=1 skips both (those tests then skip, saying why). Prints how long an install took.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_SGLANG:-0}" = "1" ]; then echo "sglang test overlays: skipped (SKIP_SGLANG=1)"; exit 0; fi

install_overlay() {  # $1 = requirements file, $2 = overlay dir
  local req=$1 dest=$2 want start
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ -f "$dest/.adaspec-stamp" ] && [ "$(cat "$dest/.adaspec-stamp")" = "$want" ]; then return 0; fi
  start=$(date +%s)
  rm -rf "$dest.tmp"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$dest.tmp" -r "$req" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$want" > "$dest.tmp/.adaspec-stamp"
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  echo "test overlay $dest: installed in $(( $(date +%s) - start ))s"
}

install_overlay requirements/sglang-cpu.txt .venv/sglang-cpu
install_overlay requirements/compose-check.txt .venv/compose-check
