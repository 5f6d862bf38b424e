#!/usr/bin/env bash
# Create or refresh the venv that trains with LLaMA-Factory for the side-by-side benches (outside the repo) and print
# its python. Like the parity venv (tests/parity/lf_venv.sh), llamafactory is pinned and never enters the product's
# dependencies; this one also carries what its training path imports (trl and friends, at versions llamafactory
# 0.9.5 accepts). torch (and triton, flash-attn, liger-kernel where installed) is borrowed from the project venv
# through a .pth file, so both sides run on the same torch build; torchaudio/torchvision are not installed (the
# driver stubs torchaudio, which only the multimodal plugin imports).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${FTJ_LF_TRAIN_VENV:-$HOME/.cache/finetune-operator/lf-train-venv}
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
  "omegaconf"
  "fire"
  "tyro<0.9"
  "sentencepiece"
  "tiktoken"
  "protobuf"
  "scipy"
  "pandas"
  "einops"
  "safetensors"
  "pydantic"
  "psutil"
  "sympy"
  "networkx"
  "filelock"
  "fsspec"
  "typing_extensions"
  "matplotlib"
)
torch_users=("accelerate==1.11.0" "peft==0.18.1" "trl==0.24.0")
want="llamafactory==$LF_VERSION ${pins[*]} ${torch_users[*]} $(sha256sum "$0" | cut -c1-16)"
if [ "$(cat "$venv/.ftj-lf-stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "lf-train-venv: installing llamafactory==$LF_VERSION and its training path into $venv" >&2
  rm -rf "$venv"
  "$project_python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "${pins[@]}" >&2
  # These require torch, which must not be downloaded again: installed without their dependencies (the rest are in
  # the list above or borrowed).
  "$venv/bin/python" -m pip install --quiet --no-deps "llamafactory==$LF_VERSION" "${torch_users[@]}" >&2
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  borrowed="$venv/borrowed-torch"
  mkdir -p "$borrowed"
  project_site=$("$project_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for entry in "$project_site"/torch "$project_site"/torchgen "$project_site"/functorch "$project_site"/triton \
      "$project_site"/nvidia "$project_site"/cuda "$project_site"/torch-*.dist-info "$project_site"/triton-*.dist-info \
      "$project_site"/flash_attn* "$project_site"/liger_kernel*; do
    [ -e "$entry" ] && ln -sfn "$entry" "$borrowed/$(basename "$entry")"
  done
  echo "$borrowed" > "$site/zz_ftj_borrowed_torch.pth"
  echo "$want" > "$venv/.ftj-lf-stamp"
fi
echo "$venv/bin/python"
