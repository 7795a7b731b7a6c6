#!/usr/bin/env bash
# Write baselines/smollm2-135m-f32.gguf: the same fp32 weights the HF and vLLM baselines serve, as an f32 GGUF for
# llama.cpp. Uses the converter shipped in the llama-cpp-python 0.3.36 sdist with its vendored gguf-py (PyPI's
# gguf 0.19.0 lacks LazyChunkedTensor, which the converter needs), in baselines/.venv-gguf with the converter's own
# pins (transformers 4.57.6, sentencepiece, torch 2.13.0 from the local wheel).
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT="${BASELINES_DIR}/smollm2-135m-f32.gguf"
SRC="${BASELINES_DIR}/llama-cpp-src"
if [[ ! -f "${SRC}/gguf-py/gguf/__init__.py" ]]; then
    mkdir -p "${SRC}"
    [[ -f "${SRC}/llama_cpp_python-0.3.36.tar.gz" ]] || "${PROJECT_PY}" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "${SRC}"
    tar xzf "${SRC}"/llama_cpp_python-0.3.36.tar.gz -C "${SRC}" --strip-components=3 --wildcards \
        '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
fi
VENV="$(venv_dir gguf)"
if [[ ! -x "${VENV}/bin/python" ]]; then
    python3.11 -m venv "${VENV}"
    "${VENV}/bin/pip" install -q "torch==2.13.0" "transformers==4.57.6" sentencepiece safetensors numpy pyyaml
fi
# transformers 4.57 does not know the "TokenizersBackend" class that transformers 5 writes; give it a copy of the
# folder (weights linked) whose tokenizer_config names the equivalent GPT2TokenizerFast.
MODEL_DIR="${BASELINES_DIR}/gguf-input"
SRC_MODEL_DIR="$(model_folder)"
mkdir -p "${MODEL_DIR}"
ln -sf "${SRC_MODEL_DIR}"/{config.json,model.safetensors,tokenizer.json} "${MODEL_DIR}/"
"${PROJECT_PY}" - "${SRC_MODEL_DIR}/tokenizer_config.json" "${MODEL_DIR}/tokenizer_config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["tokenizer_class"] = "GPT2TokenizerFast"
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
PYTHONPATH="${SRC}/gguf-py" "${VENV}/bin/python" "${SRC}/convert_hf_to_gguf.py" "${MODEL_DIR}" --outtype f32 --outfile "${OUT}"
echo "wrote ${OUT}"
