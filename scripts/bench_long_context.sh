#!/usr/bin/env bash
# Serving over long contexts on CPU: 16 streams of long prompts (scripts/long_prompt.py, 1,000 tokens by default;
# 64 different ones, so no two requests share cached keys; SHARED=1: one prompt for all, whose keys every request
# then reads from the prefix cache), 64 output tokens each, against hexgen's one process with its CPU attention kernel, hexgen with the kernel
# off (HEXGEN_CPU_ATTENTION_KERNEL=0: the gather path) and vLLM's CPU build (scripts/baselines/install_vllm.sh first),
# round-robin for ROUNDS rounds. Each server is started, measured and stopped in turn; one JSON report per server and
# round goes to OUT_DIR (default /tmp/hexgen-long-context), and one line per run to stdout.
#   DTYPE=bfloat16 ROUNDS=2 bash scripts/bench_long_context.sh
set -euo pipefail
source "$(dirname "$0")/baselines/common.sh"
DTYPE="${DTYPE:-bfloat16}"
ROUNDS="${ROUNDS:-2}"
PROMPT_TOKENS="${PROMPT_TOKENS:-1000}"
SERVERS="${SERVERS:-kernel gather vllm}"
OUT_DIR="${OUT_DIR:-/tmp/hexgen-long-context}"
PORT=8110
mkdir -p "${OUT_DIR}"
SHARED="${SHARED:-0}"
PROMPTS="${OUT_DIR}/prompts-${PROMPT_TOKENS}-$([[ "${SHARED}" == 1 ]] && echo 1 || echo 64).txt"
[[ -s "${PROMPTS}" ]] || "${PROJECT_PY}" "${REPO_ROOT}/scripts/long_prompt.py" "${PROMPT_TOKENS}" \
    --count "$([[ "${SHARED}" == 1 ]] && echo 1 || echo 64)" > "${PROMPTS}"

start() {  # start NAME: the server's start script in the background, its ready file written once it answers
    local name="$1" ready="${OUT_DIR}/ready"
    rm -f "${ready}"
    case "${name}" in
        kernel) DTYPE="${DTYPE}" PORT="${PORT}" BASELINE_READY_FILE="${ready}" \
                bash "${REPO_ROOT}/scripts/baselines/start_hexgen.sh" & ;;
        gather) HEXGEN_CPU_ATTENTION_KERNEL=0 DTYPE="${DTYPE}" PORT="${PORT}" BASELINE_READY_FILE="${ready}" \
                bash "${REPO_ROOT}/scripts/baselines/start_hexgen.sh" & ;;
        vllm) VLLM_DTYPE="${DTYPE}" PORT="${PORT}" BASELINE_READY_FILE="${ready}" \
              bash "${REPO_ROOT}/scripts/baselines/start_vllm.sh" & ;;
        *) echo "unknown server ${name} (kernel, gather, vllm)" >&2; exit 2 ;;
    esac
    STARTER=$!
    until [[ -s "${ready}" ]]; do
        kill -0 "${STARTER}" 2>/dev/null || { echo "${name} did not start" >&2; exit 1; }
        sleep 1
    done
}

stop() {
    kill -TERM "${STARTER}" 2>/dev/null || true
    wait "${STARTER}" 2>/dev/null || true
}
trap stop EXIT

echo "$(date -u '+%F %T') UTC, ${DTYPE}, $(wc -l < "${PROMPTS}") prompt(s) of ${PROMPT_TOKENS} tokens," \
    "$(lscpu | sed -n 's/Model name: *//p')"
for round in $(seq 1 "${ROUNDS}"); do
    for name in ${SERVERS}; do
        start "${name}"
        report="${OUT_DIR}/${name}-${DTYPE}-${round}.json"
        "${REPO_ROOT}/.venv/bin/hexgen" bench serve --url "http://127.0.0.1:${PORT}/v1" --model "${SERVED_MODEL_NAME}" \
            --concurrency 16 --num-requests 48 --warmup 16 --max-tokens 64 --ignore-eos --prompts-file "${PROMPTS}" \
            --json "${report}" > "${OUT_DIR}/${name}-${DTYPE}-${round}.txt"
        stop
        "${PROJECT_PY}" - "${report}" "${name}" "${round}" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
print(f"round {sys.argv[3]} {sys.argv[2]:7s} {s['output_throughput_tps']:7.1f} output tok/s  TPOT median "
      f"{s['tpot_s']['p50'] * 1e3:6.1f} ms  TTFT median {s['ttft_s']['p50']:5.2f} s  ({s['failed']} failed)", flush=True)
EOF
    done
done
