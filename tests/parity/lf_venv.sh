#!/usr/bin/env bash
# Create or refresh a LLaMA-Factory venv (outside the repo) and print its python.
#
#   tests/parity/lf_venv.sh           the reference venv: what LLaMA-Factory's data code imports (make lf-reference,
#                                     bench_preprocess --lf)
#   tests/parity/lf_venv.sh --train   a venv that also trains with it (trl and friends, at versions llamafactory
#                                     0.9.5 accepts): bench/gpu/bench_vs_llamafactory.py, bench/bench_train_cpu.py
#
# llamafactory is pinned and installed from PyPI into its own venv: it never enters the product's dependencies.
# torch (several GB of CUDA wheels) is borrowed from the project venv through a .pth file, which needs the same
# Python, so both sides of a comparison run on one torch build (with --train also triton, and flash-attn and
# liger-kernel where the project venv has them). Packages that require torch are installed without their
# dependencies, so pip never downloads torch again. torchaudio, imported by the multimodal plugin module only, is
# not installed (generate.py and bench/gpu/lf_driver.py stub it).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
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
torch_users=("peft==0.18.1" "accelerate==1.11.0")
borrow=(torch torchgen functorch triton nvidia cuda "torch-*.dist-info")
if [ "${1:-}" = "--train" ]; then
  venv=${FTJ_LF_TRAIN_VENV:-$HOME/.cache/finetune-operator/lf-train-venv}
  pins+=(omegaconf fire "tyro<0.9" sentencepiece tiktoken protobuf scipy pandas einops safetensors pydantic matplotlib)
  torch_users+=("trl==0.24.0")
  borrow+=("triton-*.dist-info" "flash_attn*" "liger_kernel*")
else
  venv=${FTJ_LF_VENV:-$HOME/.cache/finetune-operator/lf-venv}
fi
want="llamafactory==$LF_VERSION ${pins[*]} ${torch_users[*]} $(sha256sum "$0" | cut -c1-16)"
if [ "$(cat "$venv/.ftj-lf-stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "lf-venv: installing llamafactory==$LF_VERSION into $venv" >&2
  rm -rf "$venv"
  "$project_python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "${pins[@]}" >&2
  "$venv/bin/python" -m pip install --quiet --no-deps "llamafactory==$LF_VERSION" "${torch_users[@]}" >&2
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  borrowed="$venv/borrowed-torch"
  mkdir -p "$borrowed"
  project_site=$("$project_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for pattern in "${borrow[@]}"; do
    for entry in "$project_site"/$pattern; do
      [ -e "$entry" ] && ln -sfn "$entry" "$borrowed/$(basename "$entry")"
    done
  done
  echo "$borrowed" > "$site/zz_ftj_borrowed_torch.pth"
  echo "$want" > "$venv/.ftj-lf-stamp"
fi
echo "$venv/bin/python"
