# SGLang 0.5.17 (official image: CUDA, torch 2.11, transformers 5.12.1) + adaspec with its SGLang plugin.
# One pip command: the `sglang` extra pins sglang==0.5.17, which the base image already satisfies, so pip
# adds only adaspec's own pure-Python dependencies; `pip check` fails the build on any conflict.
FROM lmsysorg/sglang:v0.5.17

WORKDIR /opt/adaspec
COPY pyproject.toml README.md ./
COPY core ./core
COPY kernels ./kernels
COPY sidecar ./sidecar
COPY sglang_ext ./sglang_ext
RUN python3 -m pip install --no-cache-dir ".[sglang]" \
 && python3 -m pip check \
 && python3 -c "from importlib.metadata import entry_points as e; assert any(p.value.startswith('adaspec.') for p in e(group='sglang.srt.plugins'))"

# Sockets to the sidecar (IPC) and checkpoints live on the compose volumes mounted here.
ENV ADASPEC_TRANSPORT_RUN_DIR=/run/adaspec \
    ADASPEC_SIDECAR_STATE_DIR=/var/lib/adaspec/sidecar \
    ADASPEC_SGLANG_ADAPTIVE_BASE=/var/lib/adaspec/sidecar/base.safetensors
