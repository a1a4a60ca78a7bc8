# syntax=docker/dockerfile:1
# siteadapt step image, CUDA build: base_image of the GPU steps (train_source, adapt), scheduled on the GPU node pool.
# PyTorch's CUDA build from PyPI brings the CUDA runtime libraries as wheels (nvidia-*), so the base is a plain Python
# image; the node supplies only the NVIDIA driver (through the device plugin / container toolkit).
#   docker build -f docker/cuda.Dockerfile -t <registry>/siteadapt:<version>-cuda .
# CI should also pin the base image by digest (python:3.11.11-slim-bookworm@sha256:...).
FROM python:3.11.11-slim-bookworm

ARG TORCH_VERSION=2.13.0

LABEL org.opencontainers.image.title="siteadapt (CUDA)" \
      org.opencontainers.image.description="siteadapt training steps on NVIDIA GPUs" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    SITEADAPT_PARAMS=/opt/siteadapt/params.yaml \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --system --gid 10001 siteadapt \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/siteadapt \
       --shell /usr/sbin/nologin siteadapt

WORKDIR /opt/siteadapt
COPY docker/requirements.txt ./requirements.txt
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md params.yaml ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && python -c "import siteadapt.kfp.runtime, kfp.dsl.executor_main, mlflow, boto3, torch"

USER 10001:10001
WORKDIR /home/siteadapt
CMD ["siteadapt", "--help"]
