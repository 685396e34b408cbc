# One image for every tlpipe pipeline step, CPU or CUDA, plus a small MLflow
# tracking-server image resolved from the same dependency lock.
#
#   docker build --build-arg VARIANT=cpu  -t tlpipe:0.1.0-cpu  .
#   docker build --build-arg VARIANT=cuda -t tlpipe:0.1.0-cuda .
#   docker build --target mlflow-server   -t tlpipe-mlflow:0.1.0 .
#
# Built with BuildKit (DOCKER_BUILDKIT=1 on dockerd 20.10) and no `# syntax=` line, so no
# frontend is fetched from a registry. Where Docker Hub is out of reach, pass another base with
# the same layout (`python` on PATH, venv support): `--build-arg BASE_IMAGE=...`
# (containers/base.sh makes one with debootstrap). A private package index goes in as build
# secrets, never into a layer: `--secret id=pip.conf,src=FILE` is mounted as /etc/pip.conf for
# the pip steps only, and `--secret id=ca.crt,src=FILE` as /run/secrets/ca.crt (for pip.conf's
# `cert`). An empty TORCH_CPU_INDEX takes torch from that configured index instead.
#
# KFP lightweight components run `sh -c "... python3 -m kfp.dsl.executor_main ..."`
# in this image, so `python3` on PATH must import tlpipe and kfp, and the image sets
# no ENTRYPOINT (an ENTRYPOINT would swallow that command as arguments).
# Base images are pinned by tag; pin them by digest too in your registry mirror.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------
# builder: a venv with tlpipe[pipeline]; torch from the CPU index or default CUDA wheels
# ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ARG VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG BOTO3_VERSION=1.44.5

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv

# 1) torch first: the largest layer, and it only changes with VARIANT or the pins.
#    The CPU index serves torch==2.14.1+cpu, which satisfies pyproject's torch==2.14.1.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca.crt \
    case "${VARIANT}" in \
      cpu)  pip install ${TORCH_CPU_INDEX:+--index-url "${TORCH_CPU_INDEX}"} \
              "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" ;; \
      *)    echo "VARIANT must be 'cpu' or 'cuda', got '${VARIANT}'" >&2; exit 1 ;; \
    esac

# 2) the dependencies of tlpipe[pipeline,trainer] (torch is already satisfied, so it is kept), from
#    pyproject.toml alone: a change under src/ does not re-run this step (nor invalidate the
#    lock that the mlflow-server stage reads). boto3 lets pods use the S3 credentials of Secret
#    tlpipe-secrets directly; [trainer] is the Kubeflow SDK with which a training task submits a
#    TrainJob (`<step>.workers.nodes` > 1). CUDA: swap onnxruntime for onnxruntime-gpu of the same version
#    (both provide the `onnxruntime` module, so only one may be installed); its [cuda,cudnn]
#    extras match the CUDA 13 wheels that torch 2.14 already pulls in.
WORKDIR /src
COPY pyproject.toml README.md ./
# The local project ".[pipeline,trainer]" is pinned by pyproject.toml, which hadolint cannot see.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca.crt \
    mkdir -p src/tlpipe && touch src/tlpipe/__init__.py \
    && pip install ".[pipeline,trainer]" "boto3==${BOTO3_VERSION}" "setuptools>=77" \
    && if [ "${VARIANT}" = "cuda" ]; then \
         ort_version="$(pip show onnxruntime | sed -n 's/^Version: //p')" \
         && pip uninstall -y onnxruntime \
         && pip install "onnxruntime-gpu[cuda,cudnn]==${ort_version}"; \
       fi \
    && pip freeze --exclude tlpipe > /opt/venv/requirements.lock \
    && rm -rf src build ./*.egg-info

# 3) tlpipe itself: seconds, and the only step a source change re-runs.
#    Built without isolation by the venv's setuptools: step 2 requires pyproject's
#    build-system minimum (torch happens to pull in a newer one; the venv's own is older).
COPY src ./src
# hadolint ignore=DL3013
RUN pip install --no-deps --no-cache-dir --no-build-isolation . \
    && python -c "import tlpipe, kfp, kfp.kubernetes, kubeflow.trainer, torch, torchvision, onnxruntime, mlflow" \
    && rm -rf build ./*.egg-info

# ---------------------------------------------------------------------------
# mlflow-server: tracking server with the Postgres driver, the S3 client and the basic-auth
# app's Flask-WTF, same mlflow version as the pipeline image (constrained by the builder's
# lock). SQLAlchemy 2.1 maps `postgresql://` to psycopg 3, so that is the driver installed
# (with only psycopg2 the server exits at start: "No module named 'psycopg'").
# ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS mlflow-server

ARG PSYCOPG_VERSION=3.3.9
ARG FLASK_WTF_VERSION=1.2.2

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/mlflow/bin:$PATH \
    HOME=/tmp

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

COPY --from=builder /opt/venv/requirements.lock /tmp/requirements.lock
# mlflow and boto3 versions come from the builder's lock (--constraint).
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca.crt \
    python -m venv /opt/mlflow \
    && pip install --constraint /tmp/requirements.lock \
         mlflow boto3 "psycopg[binary]==${PSYCOPG_VERSION}" "Flask-WTF==${FLASK_WTF_VERSION}" \
    && python -c "import mlflow, boto3, psycopg, flask_wtf, sqlalchemy.dialects.postgresql" \
    && rm /tmp/requirements.lock \
    && groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
         --home-dir /tmp --shell /usr/sbin/nologin mlflow

USER 10001:10001
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]

# ---------------------------------------------------------------------------
# runtime (default target): the pipeline image
# ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG VARIANT=cpu
ARG VERSION=0.1.0
ARG GIT_SHA=unknown

LABEL org.opencontainers.image.title="tlpipe" \
      org.opencontainers.image.description="tlpipe pipeline steps (${VARIANT})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.licenses="Apache-2.0"

# No .git in the image: TLPIPE_GIT_SHA carries the commit for lineage tags.
# MPLCONFIGDIR/TORCH_HOME point at /tmp so a read-only root filesystem works.
# CUDA libraries come from the torch/onnxruntime-gpu wheels; the NVIDIA container runtime
# injects only the driver (CUDA 13 wheels need driver >= 580) for these capabilities.
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/tlpipe \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    TLPIPE_GIT_SHA=${GIT_SHA} \
    TLPIPE_IMAGE_VARIANT=${VARIANT}

# uid/gid 10001. /gcs, /minio and /s3 are where the KFP v2 launcher stages artifacts;
# older KFP backends do not mount emptyDirs there, so a non-root user needs them to exist.
RUN groupadd --system --gid 10001 tlpipe \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/tlpipe \
         --shell /usr/sbin/nologin tlpipe \
    && mkdir -p /app /gcs /minio /s3 \
    && chown 10001:10001 /app /gcs /minio /s3

COPY --from=builder /opt/venv /opt/venv
# Login shells too: the Kubeflow SDK's container backend starts each TrainJob node with
# `bash -lc`, and Debian's /etc/profile resets PATH (torchrun would not be found).
# hadolint ignore=SC2016
RUN echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/tlpipe-venv.sh

WORKDIR /app
USER 10001:10001
CMD ["tlpipe", "--help"]
