# syntax=docker/dockerfile:1
# The load generator: locust with the trident locust file, the headless wrapper and its plots.
#   docker build -f docker/locust.Dockerfile -t trident-locust:0.1.0 .
# Python 3.11 like requirements.lock; only the packages locust, tritonclient and the plots need,
# each pinned by the lock (the constraints cover their whole dependency tree).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /opt/trident
COPY requirements.lock ./
RUN grep -vE '^(torch|nvidia-pytriton)==' requirements.lock > /tmp/constraints.txt \
 && pip install --only-binary=:all: -c /tmp/constraints.txt \
        "locust==2.47.0" "tritonclient[grpc,http]==2.73.0" "matplotlib==3.11.2" "numpy==1.26.4" \
 && useradd --create-home --shell /usr/sbin/nologin --uid 10001 --user-group locust
COPY loadtest loadtest
# --user in docker-compose.yml may replace this user with the host's, to write results there.
USER 10001:10001
EXPOSE 8089 5557
CMD ["locust", "-f", "loadtest/locustfile.py", "--host", "http://triton:8000"]
