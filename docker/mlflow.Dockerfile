# syntax=docker/dockerfile:1
# MLflow tracking server + model registry for the cluster (k8s/mlflow.yaml): Postgres backend, artifacts proxied to
# the object store (clients need no object-store credentials for MLflow). The `auth` extra lets the server run
# behind its basic-auth app (`--app-name basic-auth`, k8s/MLFLOW-AUTH.md).
#   docker build -f docker/mlflow.Dockerfile -t <registry>/siteadapt-mlflow:3.17.2 docker/
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary==2.9.13 boto3==1.43.117 \
    && groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow

USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
