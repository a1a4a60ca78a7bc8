# syntax=docker/dockerfile:1
# siteadapt step image, CPU build: the Kubeflow components' base_image for ingest, preprocess, evaluate, register and
# promote (and the watcher). Built and pushed by the cluster's CI from the repository root:
#   docker build -f docker/cpu.Dockerfile -t <registry>/siteadapt:<version>-cpu .
# Python dependencies are pinned in docker/requirements.txt (docker/lock.py); PyTorch's CPU build is pinned here.
# CI should also pin the base image by digest (python:3.11.11-slim-bookworm@sha256:...).
FROM python:3.11.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="siteadapt (CPU)" \
      org.opencontainers.image.description="siteadapt pipeline steps: unsupervised domain adaptation of medical image segmenters" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    SITEADAPT_PARAMS=/opt/siteadapt/params.yaml

RUN groupadd --system --gid 10001 siteadapt \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/siteadapt \
       --shell /usr/sbin/nologin siteadapt

WORKDIR /opt/siteadapt
COPY docker/requirements.txt ./requirements.txt
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md params.yaml ./
COPY src ./src
# dependencies are all in place (pinned above): install the package alone, with the setuptools from the lock
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && python -c "import siteadapt.kfp.runtime, kfp.dsl.executor_main, mlflow, boto3, torch"

USER 10001:10001
WORKDIR /home/siteadapt
CMD ["siteadapt", "--help"]
