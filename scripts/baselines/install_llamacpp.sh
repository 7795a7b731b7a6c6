#!/usr/bin/env bash
# Create baselines/.venv-llamacpp with llama-cpp-python 0.3.36 and its server extra (builds from source, ~6 min on 2 cores).
set -euo pipefail
source "$(dirname "$0")/common.sh"
VENV="$(make_venv llamacpp)"
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" "${VENV}/bin/pip" install "llama-cpp-python[server]==0.3.36"
"${VENV}/bin/python" -c 'import llama_cpp, llama_cpp.server; print("llama_cpp", llama_cpp.__version__)'
