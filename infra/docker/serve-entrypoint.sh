#!/usr/bin/env bash
# Entry point of the model endpoint in the platform image (infra/docker/Dockerfile; infra/k8s/serve.yaml):
# `varsr serve` of one registered model, fetched from the MLflow registry at start by URI and alias.
#
#   VARSR_MODEL_URI        required, e.g. models:/varsr@champion (the alias is resolved when the pod starts)
#   VARSR_SERVE_PORT       default 8080 (/invocations, /metrics, /health/live, /health/ready)
#   VARSR_WORKERS          default: chosen by `varsr serve` from the pod's CPU quota and memory limit
#   VARSR_STOP_TIMEOUT     seconds the server gets to finish its requests after SIGTERM (default 45)
#   VARSR_SERVE_SET        space-separated serving.*/runtime.* KEY=VALUE items for `--set`
# Credentials come from the environment only (Kubernetes Secrets: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME /
# MLFLOW_TRACKING_PASSWORD, AWS_* for S3 artifacts); nothing here prints them.
# `exec`: varsr serve becomes the container's PID 1, gets Kubernetes' SIGTERM and stops its whole server group.
set -euo pipefail
if [[ -z "${VARSR_MODEL_URI:-}" ]]; then
  echo "error: set VARSR_MODEL_URI (e.g. models:/varsr@champion)" >&2
  exit 2
fi
args=(serve "$VARSR_MODEL_URI" --host 0.0.0.0 --port "${VARSR_SERVE_PORT:-8080}"
      --stop-timeout "${VARSR_STOP_TIMEOUT:-45}")
if [[ -n "${VARSR_WORKERS:-}" ]]; then
  args+=(--workers "$VARSR_WORKERS")
fi
for item in ${VARSR_SERVE_SET:-}; do
  args+=(--set "$item")
done
exec varsr "${args[@]}"
