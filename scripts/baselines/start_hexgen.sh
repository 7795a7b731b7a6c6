#!/usr/bin/env bash
# Serve the embedded model with `hexgen serve` on 127.0.0.1:$PORT, laid out by the plan $PLAN
# (default: one replica in one process; examples/plans/local-default.json is the two-replica default), in $DTYPE
# (default float32; bfloat16 pays off where the CPU has bf16 arithmetic).
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${PORT:-8104}"
PLAN="${PLAN:-${REPO_ROOT}/examples/plans/local-single.json}"
run_server "${BASELINES_DIR}/hexgen.log" "${REPO_ROOT}/.venv/bin/hexgen" serve --model smollm2-135m \
    --plan "${PLAN}" --dtype "${DTYPE:-float32}" --host 127.0.0.1 --port "${PORT}" --max-batch 16
