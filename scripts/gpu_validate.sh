#!/usr/bin/env bash
# GPU runbook (docs/gpu-runbook.md): on a machine with an NVIDIA GPU, SGLang 0.5.17 and adaspec[sglang],
# serve SmolLM2-135M-Instruct with no speculation, EAGLE3 (our static head), EAGLE3 --speculative-adaptive,
# NGRAM and ATLAS in turn; check every ATLAS/EAGLE/NGRAM output against SGLang's own no-spec greedy output and
# measure tok/s on the drift stream. One table + the exact commands -> docs/gpu-results.md (OUT=...).
# Extra arguments go to `python -m adaspec.sglang_ext.validate` (e.g. --per-phase 16 --concurrency 8).
# Exit: 0 all lossless, 1 some output differed, 2 the machine is not ready.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-docs/gpu-results.md}
export ADASPEC_CACHE_DIR=${ADASPEC_CACHE_DIR:-$HOME/.cache/adaspec}

die() { echo "error: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || die "no NVIDIA GPU (nvidia-smi -L failed)"
"$PY" - <<'PYEOF' || die "needs sglang==0.5.17 and adaspec (pip install 'adaspec[sglang]') in $PY"
from importlib.metadata import entry_points, version
assert version("sglang") == "0.5.17", version("sglang")
assert any(e.value.startswith("adaspec.") for e in entry_points(group="sglang.srt.plugins"))
PYEOF

# The model: the pinned SmolLM2-135M-Instruct, converted to a safetensors dir (idempotent).
"$PY" -m adaspec.core.cli models fetch
MODEL=$("$PY" -c "from adaspec.core.config import Settings; from adaspec.core.models import resolve_model_path; print(resolve_model_path(Settings()))")

# The static head in SGLang's EAGLE-3 format: shipped, ADASPEC_STATIC_HEAD_PATH, or trained here (on the GPU).
find_head() {
  "$PY" -c "from adaspec.core.config import Settings; from adaspec.core.drafters.eagle3 import resolve_static_head as r; s=Settings(); print(r(s.static_head_path, s.cache_dir, s.model))" 2>/dev/null
}
HEAD=$(find_head) || { ADASPEC_DEVICE=cuda "$PY" -m adaspec.core.cli train-static; HEAD=$(find_head); } \
  || die "no static head after train-static"

# The sidecar (ATLAS's adaptive drafter learns from it); it writes the head base on first start.
export ADASPEC_TRANSPORT_RUN_DIR=${ADASPEC_TRANSPORT_RUN_DIR:-$(mktemp -d)}
export ADASPEC_SIDECAR_STATE_DIR=${ADASPEC_SIDECAR_STATE_DIR:-$ADASPEC_CACHE_DIR/sidecar-gpu-validate}
export ADASPEC_SGLANG_ADAPTIVE_BASE=$ADASPEC_SIDECAR_STATE_DIR/base.safetensors
export ADASPEC_MODEL=$MODEL
mkdir -p "$(dirname "$OUT")"
"$PY" -m adaspec.core.cli sidecar serve > "${OUT%.md}-sidecar.log" 2>&1 &
SIDECAR=$!
trap 'kill $SIDECAR 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  "$PY" -m adaspec.core.cli sidecar status >/dev/null 2>&1 && break
  kill -0 $SIDECAR 2>/dev/null || die "sidecar exited (see ${OUT%.md}-sidecar.log)"
  sleep 1
done

echo "model $MODEL, static head $HEAD"
"$PY" -m adaspec.sglang_ext.validate --model "$MODEL" --head "$HEAD" --out "$OUT" "$@"
