# SGLang 0.5.17 (official image: CUDA, torch 2.11, transformers 5.12.1) + adaspec with its SGLang plugin.
# One pip command: the `sglang` extra pins sglang==0.5.17, which the base image already satisfies, so pip
# adds only adaspec's own pure-Python dependencies; the build fails if that moved sglang, torch or
# transformers off the image's versions, or if SGLang would not find the plugin's entry point.
FROM lmsysorg/sglang:v0.5.17

WORKDIR /opt/adaspec
COPY pyproject.toml README.md ./
COPY core ./core
COPY kernels ./kernels
COPY sidecar ./sidecar
COPY sglang_ext ./sglang_ext
RUN python3 -c "from importlib.metadata import version as v; print(v('torch'), v('transformers'))" > /tmp/before \
 && python3 -m pip install --no-cache-dir ".[sglang]" \
 && python3 -c "from importlib.metadata import version as v; print(v('torch'), v('transformers'))" | cmp - /tmp/before \
 && python3 -c "from importlib.metadata import entry_points as e, version as v; assert v('sglang') == '0.5.17'; \
assert any(p.value.startswith('adaspec.') for p in e(group='sglang.srt.plugins'))"

# Sockets to the sidecar (IPC) and checkpoints live on the compose volumes mounted here.
ENV ADASPEC_TRANSPORT_RUN_DIR=/run/adaspec \
    ADASPEC_SIDECAR_STATE_DIR=/var/lib/adaspec/sidecar \
    ADASPEC_SGLANG_ADAPTIVE_BASE=/var/lib/adaspec/sidecar/base.safetensors
