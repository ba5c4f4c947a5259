#!/usr/bin/env bash
# Start an MLflow tracking server. Configuration comes only from the environment (nothing secret is written
# to disk or echoed):
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///$PWD/mlflow.db   (at scale: postgresql://user:pass@host/db)
#   MLFLOW_ARTIFACTS_DESTINATION  default $PWD/mlartifacts           (at scale: s3://bucket/prefix)
#   MLFLOW_HOST                   default 127.0.0.1 (loopback unless you say otherwise)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                default 2
set -euo pipefail
backend=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow.db}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlartifacts}
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
# print the store without credentials (user:password@ is masked)
echo "mlflow server: backend=$(sed -E 's#//[^@/]*@#//***@#' <<<"$backend") artifacts=$artifacts on $host:$port" >&2
exec mlflow server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" \
  --workers "${MLFLOW_WORKERS:-2}"
