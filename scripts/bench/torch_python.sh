# Sourced by the scripts that compare with PyTorch (bench/allreduce.sh, bench/train.sh,
# check_pytorch_example.sh): sets TORCH_PYTHON to a Python that imports torch. Takes
# TORCH_PYTHON if set; otherwise makes ./.venv-torch with torch from PyPI on first use (about
# 5 GB; .venv-torch/ is ignored by git). Run from the repository root.
if [[ -z "${TORCH_PYTHON:-}" ]]; then
  if [[ ! -x .venv-torch/bin/python ]]; then
    echo "==> installing torch into .venv-torch (about 5 GB)" >&2
    python3 -m venv .venv-torch
    .venv-torch/bin/pip install --quiet --progress-bar off torch numpy
  fi
  TORCH_PYTHON=$(pwd)/.venv-torch/bin/python
fi
"$TORCH_PYTHON" -c 'import torch' || { echo "error: $TORCH_PYTHON cannot import torch" >&2; exit 1; }
