#!/usr/bin/env bash
# Serve the embedded model with HF transformers' own `transformers serve` (OpenAI API) on 127.0.0.1:$PORT.
# Uses the project's venv: transformers 5.23 plus fastapi/uvicorn are already project dependencies.
# HF_CB=1 turns on its continuous batching (paged attention); default off, i.e. plain generate, one request at a time.
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${PORT:-8101}"
MODEL_DIR="$(model_folder)"
SERVED_MODEL_NAME="${MODEL_DIR}"  # it is pinned to the folder and refuses any other model name
mkdir -p "${BASELINES_DIR}/hf-hub-cache"  # its /v1/models scans the hub cache and fails when the folder is missing
CB_FLAG="--no-continuous-batching"
[[ "${HF_CB:-0}" == "1" ]] && CB_FLAG="--continuous-batching"
HF_HUB_OFFLINE=1 HF_HUB_CACHE="${BASELINES_DIR}/hf-hub-cache" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" \
    run_server "${BASELINES_DIR}/hf.log" "${REPO_ROOT}/.venv/bin/transformers" serve "${MODEL_DIR}" \
    --host 127.0.0.1 --port "${PORT}" --device cpu --dtype "${HF_DTYPE:-float32}" "${CB_FLAG}" --log-level warning
