# The serving image: rnnserve-server and rnnserve-client with the default model, and no torch.
# The `train` extra (torch, onnxscript) is only for making bundles; serving needs onnxruntime alone.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
# The serving lock first, in a layer of its own (rebuilt only when the lock changes): the exact versions and
# hashes the tests ran with, the build backend among them.
COPY requirements/serving.lock requirements/serving.lock
RUN pip install --require-hashes --no-deps -r requirements/serving.lock
COPY rnnserve rnnserve
COPY proto proto
COPY server server
COPY client client
COPY export export
# A plain install (not editable), so the shipped model repository in rnnserve/models (the default
# model's float version 1 and its int8 version 2) is inside the installed package and the sources can go.
# The lock carries the `redis` extra, which lets replicas share sessions through Redis (--redis-url).
RUN pip install --no-deps --no-build-isolation . && rm -rf /src

RUN useradd --system --no-create-home rnnserve
USER rnnserve
WORKDIR /home/rnnserve

# gRPC, HTTP/JSON (with the playground), and Prometheus metrics at /metrics, on every interface of
# the container: which of them reach the host is decided where the container's ports are published.
ENV RNNSERVE_LISTEN=0.0.0.0:50051 \
    RNNSERVE_HTTP_LISTEN=0.0.0.0:8080 \
    RNNSERVE_METRICS_LISTEN=0.0.0.0:9464
EXPOSE 50051 8080 9464
CMD ["rnnserve-server"]
