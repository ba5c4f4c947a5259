#!/usr/bin/env bash
# Start an MLflow tracking server (the recipe the tests run: tests/services.py `mlflow_server`).
# Configuration comes only from the environment; no secret is written to disk, put on a command line or printed.
#
#   backend store, either as parts (the password may hold any character; it is URL-encoded for you):
#     MLFLOW_DB_HOST, MLFLOW_DB_PORT (5432), MLFLOW_DB_NAME (mlflow), MLFLOW_DB_USER (mlflow),
#     MLFLOW_DB_PASSWORD or MLFLOW_DB_PASSWORD_FILE (a mounted secret)
#   or as one URI (already URL-encoded):
#     MLFLOW_BACKEND_STORE_URI        postgresql://user:pass@host:5432/db   (default: sqlite:///$PWD/mlflow.db)
#   artifacts (proxied by the server: clients see mlflow-artifacts:/ and need no object-store credentials):
#     MLFLOW_ARTIFACTS_DESTINATION    s3://bucket/prefix (default: $PWD/mlartifacts); the bucket is created if missing
#     AWS_ENDPOINT_URL                S3-compatible endpoint (MinIO, moto, ...); unset for AWS itself
#     AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION
#   network:
#     MLFLOW_HOST                     bind address (default 127.0.0.1: loopback unless you say otherwise)
#     MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
#     MLFLOW_SERVER_ALLOWED_HOSTS     Host headers to accept, e.g. mlflow.internal:5000,mlflow.internal
#                                     (loopback stays allowed; unset = MLflow's default: localhost + private IPs)
#     MLFLOW_SERVER_CORS_ALLOWED_ORIGINS  browser origins allowed to call the API, e.g. https://mlflow.example.com
#   MLFLOW_STARTUP_WAIT_S             seconds to wait for the database / object store to come up (default 30)
#
# Fails with one line on stderr (exit 2) when a driver is missing, the database or the S3 endpoint cannot be
# reached, or the credentials are refused.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python}" "$here/serve.py"
