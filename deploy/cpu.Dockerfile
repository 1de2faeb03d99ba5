# adaspec on a machine without a GPU: `adaspec serve` (reference engine, OpenAI API) and the sidecar.
# torch comes first, from PyTorch's CPU index (PyPI's default wheel is a multi-GB CUDA build); the build fails
# if installing adaspec moved it off the CPU build or if the console script does not answer.
FROM python:3.11-slim

RUN python3 -m pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /opt/adaspec
COPY pyproject.toml README.md ./
COPY core ./core
COPY kernels ./kernels
COPY sidecar ./sidecar
COPY sglang_ext ./sglang_ext
RUN python3 -m pip install --no-cache-dir . \
 && python3 -c "import torch; assert torch.version.cuda is None, torch.__version__" \
 && adaspec policies > /dev/null

ENV ADASPEC_CACHE_DIR=/cache/adaspec \
    ADASPEC_TRANSPORT_RUN_DIR=/run/adaspec \
    ADASPEC_SIDECAR_STATE_DIR=/var/lib/adaspec/sidecar
EXPOSE 8000
