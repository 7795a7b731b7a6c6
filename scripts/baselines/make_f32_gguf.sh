#!/usr/bin/env bash
# Write baselines/smollm2-135m-f32.gguf: the same fp32 weights the HF and vLLM baselines serve, as an f32 GGUF for
# llama.cpp. Uses the converter shipped in the llama-cpp-python 0.3.36 sdist, run with the project's venv
# (transformers, gguf 0.19.0 and torch are already there).
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT="${BASELINES_DIR}/smollm2-135m-f32.gguf"
SRC="${BASELINES_DIR}/llama-cpp-src"
if [[ ! -f "${SRC}/convert_hf_to_gguf.py" ]]; then
    mkdir -p "${SRC}"
    "${PROJECT_PY}" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "${SRC}"
    tar xzf "${SRC}"/llama_cpp_python-0.3.36.tar.gz -C "${SRC}" --strip-components=3 --wildcards \
        '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*'
fi
"${PROJECT_PY}" "${SRC}/convert_hf_to_gguf.py" "$(model_folder)" --outtype f32 --outfile "${OUT}"
echo "wrote ${OUT}"
