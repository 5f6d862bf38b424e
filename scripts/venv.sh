#!/usr/bin/env bash
# Create or refresh the project's virtual environment and print its bin directory.
#
# The environment lives outside the checkout (torch with its CUDA wheels is several GB) and is shared by every
# checkout on this machine: it is re-synced when pyproject.toml changes, and the project itself is installed in
# editable mode from whichever checkout asks, so `ftj` and `python -m finetune_trainer` always run this tree.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${FTJ_VENV:-$HOME/.cache/finetune-operator/venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "venv: creating $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel >&2
fi

want="$(sha256sum "$root/pyproject.toml" | cut -c1-16) $root"
have=$(cat "$venv/.ftj-stamp" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "venv: installing finetune-operator[trainer,dev] from $root (pip's cache keeps this quick after the first time)" >&2
  start=$SECONDS
  "$venv/bin/python" -m pip install --quiet -e "$root[trainer,dev]" >&2
  echo "$want" > "$venv/.ftj-stamp"
  echo "venv: ready in $((SECONDS - start))s" >&2
fi
echo "$venv/bin"
