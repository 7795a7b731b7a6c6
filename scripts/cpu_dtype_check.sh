#!/usr/bin/env bash
# float32 against bfloat16 on a CPU, on 2 of its cores as on the CPU machines: `hexgen bench engine` on a
# random-weight SmolLM2-135M-shaped model it builds itself, then `hexgen serve` of that model at 1 and 16 streams
# (64 tokens each) in each dtype. Meant for a CPU with bf16 arithmetic (AVX512_BF16 / AMX, e.g. the GPU machine's
# host), where the engine issue asks bf16 to beat fp32; on an AVX2-only CPU it shows the opposite.
#
#   bash scripts/cpu_dtype_check.sh            on the GPU machine (carry .whl: see gpu_check.sh --fetch-wheels)
#   bash scripts/cpu_dtype_check.sh --local    here, with the project's venv
#   bash scripts/cpu_dtype_check.sh --dry-run  here: the same steps with short loads
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=python3
CORES="${CORES:-0,1}"
BENCH_ARGS=(--repeats 3 --batch-sizes 1 16)
SERVE_LOADS=("1 6 64" "16 48 64")  # streams, requests, tokens each
case "${1:-}" in
    "") ;;
    --local) PYTHON=.venv/bin/python ;;
    --dry-run) PYTHON=.venv/bin/python; BENCH_ARGS=(--repeats 1 --new-tokens 4 --batch-sizes 1 4);
               SERVE_LOADS=("1 2 8" "4 8 8") ;;
    *) echo "usage: bash scripts/cpu_dtype_check.sh [--local | --dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-$(mktemp -d)}"
MODEL_DIR="$(mktemp -d)/random-smollm2-135m"
BUDGET_S="${BUDGET_S:-280}"
cap() { local left=$(( BUDGET_S - SECONDS - $2 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD"
if [[ -z "${1:-}" && -d .whl ]]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi

echo "== machine (cores $CORES of $(nproc))"
grep -m1 "model name" /proc/cpuinfo
grep -m1 -o -w -E "avx512_bf16|amx_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
taskset -c "$CORES" $PYTHON -c 'import torch; print("torch", torch.__version__, "| threads", torch.get_num_threads(),
      "| oneDNN bf16", torch.ops.mkldnn._is_mkldnn_bf16_supported())'

echo "== hexgen bench engine --shape smollm2-135m --device cpu --dtype float32 bfloat16 (cores $CORES)"
timeout "$(cap 150 100)" taskset -c "$CORES" $PYTHON -m hexgen.cli bench engine --shape smollm2-135m --device cpu \
    --dtype float32 bfloat16 --layout 1 "${BENCH_ARGS[@]}" --save-model "$MODEL_DIR" \
    --markdown "$OUT/bench-engine-cpu.md" > "$OUT/bench-engine-cpu.log" 2>&1
bench_rc=$?
(( bench_rc == 0 )) || tail -5 "$OUT/bench-engine-cpu.log"

serve_rc=0
for dtype in float32 bfloat16; do
    echo "== hexgen serve --device cpu --dtype $dtype (cores $CORES) under hexgen bench serve"
    mkdir -p "$OUT/$dtype"
    SERVE_DTYPE=$dtype taskset -c "$CORES" bash scripts/serve_check.sh "$PYTHON" "$MODEL_DIR" cpu "$OUT/$dtype" \
        "$(cap 60 10)" "${SERVE_LOADS[@]}" > "$OUT/$dtype/serve-check.log" 2>&1 || serve_rc=1
done
rm -rf "$(dirname "$MODEL_DIR")"

echo "== results after ${SECONDS} s (engine bench exit $bench_rc, serving exit $serve_rc)"
cat "$OUT/bench-engine-cpu.md" 2>/dev/null
cat "$OUT/float32/serve.md" "$OUT/bfloat16/serve.md" 2>/dev/null
# At most 8 files come back from a device call: the logs and JSON travel as one archive.
(cd "$OUT" && tar czf cpu-logs.tar.gz --remove-files -- *.log */*.log */*.json 2>/dev/null)
[[ $bench_rc -eq 0 && $serve_rc -eq 0 ]]
