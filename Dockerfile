# inpaint-server image. The default is the GPU image: NVIDIA's CUDA 13 base (the CUDA runtime and the
# variables the NVIDIA container toolkit reads) and PyPI's CUDA 13 build of torch, which carries cuBLAS,
# cuDNN and NCCL itself (so the base is NVIDIA's "base" flavour, not "runtime": no second copy of them).
#
#   docker build -t inpaint-server .
#   docker run --gpus all -p 8000:8000 -v inpaint-data:/data -v inpaint-models:/models inpaint-server
#
# Build arguments choose the base and the torch build, so the same file builds a CPU image:
#   BASE_IMAGE         any Debian or Ubuntu image; Python >= 3.11 and tini are installed when missing
#   TORCH_REQUIREMENT  what pip installs first, on its own layer (default torch==2.13.0)
#   TORCH_INDEX_URL    an index for torch only, e.g. https://download.pytorch.org/whl/cpu or .../cu128
#   EXTRAS             the project's extras (default gpu,fp8,postgres,s3: GPU JPEG, FP8, the PostgreSQL store, S3 files)
# e.g. docker build --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg EXTRAS= \
#        --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t inpaint-server:cpu .
# A private package mirror: mount a pip.conf (podman build -v ./pip.conf:/etc/pip.conf:ro, or a BuildKit
# secret), never a build argument: arguments are kept in the image's history.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_REQUIREMENT="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ARG EXTRAS="gpu,fp8,postgres,s3"
ARG UID=10001

LABEL org.opencontainers.image.title="inpaint-server" \
      org.opencontainers.image.description="Self-hosted, fal-compatible server for few-step SDXL inpainting" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python, venv and tini (PID 1: forwards SIGTERM to the server and reaps children) when the base lacks
# them; a fixed non-root uid; the two volumes owned by it (a new named volume takes this ownership).
# Versions are the base distribution's own: pinning them would tie the file to one base.
# hadolint ignore=DL3008
RUN if ! command -v tini >/dev/null || ! python3 -c 'import ensurepip, sys; assert sys.version_info >= (3, 11)'; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates tini \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid "${UID}" inpaint \
    && useradd --uid "${UID}" --gid "${UID}" --create-home --home-dir /home/inpaint --shell /usr/sbin/nologin inpaint \
    && python3 -m venv /opt/inpaint-server \
    && mkdir -p /data /models \
    && chown "${UID}:${UID}" /data /models

ENV PATH=/opt/inpaint-server/bin:${PATH} \
    VIRTUAL_ENV=/opt/inpaint-server \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# torch alone first: the largest layer, rebuilt only when these arguments change. Its exact version is
# then a constraint for everything after, so no later requirement can swap the build for another.
# (Pinned: TORCH_REQUIREMENT is torch==VERSION; hadolint cannot see through the argument.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} "${TORCH_REQUIREMENT}" \
    && python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' \
        > /opt/inpaint-server/torch-constraint.txt

# The project's dependencies and build requirements, read from pyproject.toml alone: a code change does
# not reinstall them.
COPY pyproject.toml /tmp/inpaint-build/pyproject.toml
RUN python -c 'import sys, tomllib; t = tomllib.load(open(sys.argv[1], "rb")); p = t["project"]; \
extras = [e for e in sys.argv[2].split(",") if e]; \
reqs = p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]; \
print("\n".join(reqs + t["build-system"]["requires"]))' \
        /tmp/inpaint-build/pyproject.toml "${EXTRAS}" > /tmp/inpaint-build/requirements.txt \
    && pip install --no-cache-dir -c /opt/inpaint-server/torch-constraint.txt -r /tmp/inpaint-build/requirements.txt

# The project itself (a wheel built from the context, not an editable install): seconds, and no network.
COPY . /tmp/inpaint-build/
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/inpaint-build \
    && rm -rf /tmp/inpaint-build

# Settings for the container: every interface, the two volumes, secrets as files (see the README).
# Compile caches live in the data volume (INPAINT_COMPILE_CACHE_DIR defaults to /data/compile-cache).
# INPAINT_SECRETS_DIR names the folder secrets are mounted in; it holds no secret itself.
# hadolint ignore=DL3064
ENV INPAINT_HOST=0.0.0.0 \
    INPAINT_PORT=8000 \
    INPAINT_DATA_DIR=/data \
    INPAINT_SECRETS_DIR=/run/secrets \
    HF_HOME=/models \
    HOME=/home/inpaint

USER ${UID}:${UID}
WORKDIR /data
VOLUME ["/data", "/models"]
EXPOSE 8000

# SIGTERM drains (drain_grace_s, 30 s by default): stop with a timeout of at least drain_grace_s + 10 s
# (docker stop -t 45, compose stop_grace_period: 45s, Kubernetes terminationGracePeriodSeconds: 45).
STOPSIGNAL SIGTERM
# Liveness only. Readiness (/health/ready: models loaded and warm) is for load balancers and probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["inpaint-server", "health"]

ENTRYPOINT ["tini", "--", "inpaint-server"]
CMD ["serve"]
