#!/usr/bin/env bash
# Create or refresh the LLaMA-Factory reference venv (outside the repo) and print its python.
#
# llamafactory is pinned and installed from PyPI into its own venv: it never enters the product's dependencies.
# Only the parts its data code imports are installed (its own pins where it has them). torch (several GB of CUDA
# wheels, imported but unused by the text path) is borrowed from the project venv through a .pth file, which needs
# the same Python; torchaudio, imported by its multimodal plugin module only, is not installed (generate.py stubs it).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${FTJ_LF_VENV:-$HOME/.cache/finetune-operator/lf-venv}
project_bin=$("$root/scripts/venv.sh")
project_python="$project_bin/python"
LF_VERSION=0.9.5
pins=(
  "transformers==5.6.0"
  "datasets==4.0.0"
  "tokenizers"
  "jinja2"
  "numpy"
  "packaging"
  "pyyaml"
  "fsspec"
  "typing_extensions"
  "sympy"
  "networkx"
  "filelock"
  "psutil"
)
want="llamafactory==$LF_VERSION ${pins[*]} $(sha256sum "$0" | cut -c1-16)"
if [ "$(cat "$venv/.ftj-lf-stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "lf-venv: installing llamafactory==$LF_VERSION into $venv" >&2
  rm -rf "$venv"
  "$project_python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "${pins[@]}" >&2
  "$venv/bin/python" -m pip install --quiet --no-deps "llamafactory==$LF_VERSION" "peft==0.18.1" "accelerate==1.11.0" >&2
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  borrowed="$venv/borrowed-torch"
  mkdir -p "$borrowed"
  project_site=$("$project_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for entry in "$project_site"/torch "$project_site"/torchgen "$project_site"/functorch "$project_site"/triton \
      "$project_site"/nvidia "$project_site"/cuda "$project_site"/torch-*.dist-info; do
    [ -e "$entry" ] && ln -sfn "$entry" "$borrowed/$(basename "$entry")"
  done
  echo "$borrowed" > "$site/zz_ftj_borrowed_torch.pth"
  echo "$want" > "$venv/.ftj-lf-stamp"
fi
echo "$venv/bin/python"
