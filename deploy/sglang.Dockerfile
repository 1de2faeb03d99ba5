# SGLang 0.5.17 (official image: CUDA, torch 2.11, transformers 5.12.1) + adaspec with its SGLang plugin.
# adaspec's `sglang` extra is sglang==0.5.17 alone, which the base image already is, so it is checked, never
# handed to pip: `pip install ".[sglang]"` would let pip re-resolve sglang's exact pins (flashinfer cu13,
# sglang-kernel, torch...) against PyPI on top of the image. adaspec goes in with --no-deps, then only its own
# requirements ([project].dependencies, read back from the installed metadata). deploy/check_image.py fails the
# build if that moved sglang, torch, transformers or anything sglang pins, left an adaspec requirement (extra
# included) unmet, added a `pip check` complaint to the base image's own, if SGLang's plugin entry point does
# not load and register ATLAS, or if the head compose serves is not the package's shipped head.
FROM lmsysorg/sglang:v0.5.17

WORKDIR /opt/adaspec/src
COPY pyproject.toml README.md ./
COPY core ./core
COPY kernels ./kernels
COPY sidecar ./sidecar
COPY sglang_ext ./sglang_ext
COPY deploy/check_image.py ./deploy/check_image.py
COPY deploy/provision.py ./deploy/provision.py
RUN python3 deploy/check_image.py snapshot /tmp/adaspec-before.json \
 && python3 -m pip install --no-cache-dir --no-deps . \
 && python3 deploy/check_image.py requirements > /tmp/adaspec-requirements.txt \
 && python3 -m pip install --no-cache-dir -r /tmp/adaspec-requirements.txt \
 && python3 deploy/check_image.py verify /tmp/adaspec-before.json \
      /opt/adaspec/src/core/heads/pretrained/smollm2-135m-instruct-eagle3 \
 && rm -f /tmp/adaspec-before.json /tmp/adaspec-requirements.txt

# The processes run from here, not from the source tree: `python3 -m sglang.launch_server` puts its working
# directory first on sys.path, where the tree's top-level `kernels` folder would shadow the `kernels` package
# SGLang's FA3 loader imports. The source tree stays: compose serves its shipped head
# (/opt/adaspec/src/core/heads/pretrained/smollm2-135m-instruct-eagle3, byte-identical to the package data the
# build compared it with) and runs deploy/provision.py from it.
WORKDIR /opt/adaspec

# The model cache, sockets to the sidecar (IPC) and checkpoints live on the compose volumes mounted here.
ENV ADASPEC_CACHE_DIR=/cache/adaspec \
    ADASPEC_TRANSPORT_RUN_DIR=/run/adaspec \
    ADASPEC_SIDECAR_STATE_DIR=/var/lib/adaspec/sidecar \
    ADASPEC_SGLANG_ADAPTIVE_BASE=/var/lib/adaspec/sidecar/base.safetensors
