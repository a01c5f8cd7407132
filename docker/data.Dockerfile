# syntax=docker/dockerfile:1
# The slim CPU image for the data stages (and the Prefect server and worker of docker/compose.yaml):
# python slim, torch's CPU build as pinned in requirements/torch-cpu.txt, everything else from
# requirements/lock.txt exactly (--no-deps), no compilers in the final image. It runs every data
# stage, the contamination check and the report; CPU training and evaluation work too, but the
# training image (docker/Dockerfile) is the one for GPUs.
#   docker build -f docker/data.Dockerfile -t hrm-pipeline:data .
#   docker run --rm -v "$PWD/runs:/opt/hrm-pipeline/runs" hrm-pipeline:data run demo --no-progress
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# a compiler for any locked package that builds from source; left behind in this stage
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/
ENV UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN uv venv --python /usr/local/bin/python3 /opt/venv
WORKDIR /opt/hrm-pipeline
COPY requirements requirements
# torch's CPU build (the multi-GB CUDA build is not wanted here), then the lock; DeepSpeed's sdist
# imports torch while it builds, so it is built against that torch (no build isolation)
RUN uv pip install --no-deps --index-url https://download.pytorch.org/whl/cpu -r requirements/torch-cpu.txt \
    && grep -E '^(setuptools|packaging|ninja|py-cpuinfo|psutil|numpy|wheel)==' requirements/lock.txt > /tmp/build-tools.txt \
    && uv pip install --no-deps -r /tmp/build-tools.txt \
    && uv pip install --no-deps --no-build-isolation-package deepspeed -r requirements/lock.txt
COPY pyproject.toml README.md Makefile ./
COPY scripts scripts
COPY pipeline pipeline
COPY model model
COPY flows flows
COPY training training
COPY evaluation evaluation
COPY benchmarks benchmarks
COPY data_specs data_specs
COPY docker docker
RUN uv pip install --no-deps --no-build-isolation -e .

FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/hrm-pipeline /opt/hrm-pipeline
WORKDIR /opt/hrm-pipeline
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/hf \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    PREFECT_HOME=/cache/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
RUN mkdir -p /cache/hf /cache/torch_extensions /cache/prefect /opt/hrm-pipeline/runs /data /checkpoints \
    && hrm --help > /dev/null
VOLUME ["/cache", "/opt/hrm-pipeline/runs", "/data", "/checkpoints"]
ENTRYPOINT ["hrm"]
CMD ["run", "demo", "--no-progress"]
