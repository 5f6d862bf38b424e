#!/usr/bin/env bash
# Create or refresh the MLflow tracking-server venv (outside the repo) and print its bin directory.
#
# The tracking tests start a real MLflow server (PyPI mlflow, pinned here) on loopback. The full mlflow package
# pins an older pyarrow than the trainer needs, so the server lives in its own venv; the trainer talks to it with
# the mlflow-skinny client of the project venv, as a trainer Pod would.
set -euo pipefail

venv=${FTJ_MLFLOW_VENV:-$HOME/.cache/finetune-operator/mlflow-venv}
MLFLOW_VERSION=3.17.2
want="mlflow==$MLFLOW_VERSION $(sha256sum "$0" | cut -c1-16)"
if [ "$(cat "$venv/.ftj-mlflow-stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "mlflow-venv: installing mlflow==$MLFLOW_VERSION into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "mlflow==$MLFLOW_VERSION" >&2
  echo "$want" > "$venv/.ftj-mlflow-stamp"
fi
echo "$venv/bin"
