#!/usr/bin/env bash
# The whole GPU check in one device call (under 8 minutes on an H200, steps cut to a budget of $BUDGET_S s):
# gpu-marked tests, `hexgen bench engine --device cuda` on a random-weight Llama-3-8B-shaped model it builds
# itself (kept, with a word-level tokenizer of its vocabulary; its decode table times the steps overlapped, the
# engine's default on one GPU, and in series), `hexgen serve` of that model on the GPU under
# `hexgen bench serve` at 64 streams x 128 tokens, at 1 stream and at 64 with log-probabilities, each Triton kernel
# beside torch (scripts/kernel_bench.py), then `hexgen profile --model` of the GPU on that checkpoint for the planner (not
# part of the pass / fail: a bonus if time is left). If the engine bench fails (not by timing out), it runs again
# without CUDA graphs, then with torch ops instead of the Triton kernels too (HEXGEN_TRITON=0), and serving uses
# the mode that worked.
#
#   bash scripts/gpu_check.sh --fetch-wheels   here, once: the Python packages the GPU image lacks -> .whl/
#   bash scripts/gpu_check.sh                  on the GPU machine (carry .whl); tables and logs under $OUT
#   bash scripts/gpu_check.sh --dry-run        here, on CPU: the same steps on a tiny shape, in about a minute
#
# The GPU image has its own torch, transformers and triton (see ../shared/reference/gpu-h200.md): the
# checkout goes on PYTHONPATH, never installed (the image may lack setuptools; the CLI runs without package
# metadata), and only the packages the image lacks travel, as wheels. Device call: carry [".whl"], timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/.."

# Pinned as in pyproject.toml / the venv; --no-deps, so every missing dependency is named.
WHEELS="pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  uvicorn==0.54.0 gguf==0.19.0 pyzmq==27.3.0
  click==8.5.1 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 Pygments==2.21.0"  # the last five: in case the image lacks them

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
fi

PYTHON=python3
SHAPE=llama-3-8b
DEVICE=cuda
BENCH_ARGS=(--device cuda --dtype bfloat16)
# streams, requests, tokens each [, log-probabilities asked]: the issue's 64 x 128 target, latency, what logprobs cost
SERVE_LOADS=("64 256 128" "1 8 128" "64 128 128 5")
BREAKDOWN_ARGS=""
if [[ "${1:-}" == "--dry-run" ]]; then
    DEVICE=cpu
    PYTHON=.venv/bin/python
    SHAPE=tiny
    BENCH_ARGS=(--device cpu --dtype bfloat16 --batch-sizes 1 4 --new-tokens 4 --repeats 1 --layout 1)
    SERVE_LOADS=("8 16 16" "1 2 16" "8 16 16 5")
    BREAKDOWN_ARGS="--batches 1 4 --contexts 288 --steps 3"
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash scripts/gpu_check.sh [--fetch-wheels | --dry-run]" >&2
    exit 2
fi
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
MODEL_DIR="$(mktemp -d)/random-$SHAPE"  # the engine bench keeps its checkpoint here for the serving step
BUDGET_S="${BUDGET_S:-500}"  # the device call's timeout_s is 540
# seconds a step may take: at most $1, leaving $2 for the steps after it (at least 1)
cap() { local left=$(( BUDGET_S - SECONDS - $2 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD"
if [[ "${1:-}" != "--dry-run" ]]; then
    if [[ -d .whl ]]; then
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:$PWD"
    fi
fi

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PYTHON -c 'import torch, transformers, importlib.util as u
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(), "| transformers", transformers.__version__,
      "| triton", __import__("triton").__version__ if u.find_spec("triton") else "absent")'

echo "== gpu-marked tests"
timeout "$(cap 150 300)" $PYTHON -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests 2>&1 \
    | tee "$OUT/pytest-gpu.log" | tail -40
tests_rc=${PIPESTATUS[0]}
# A module the GPU image cannot import (e.g. ray's tests) is a collection error, not a failed GPU test.
tests_failed=$(grep -c '^FAILED' "$OUT/pytest-gpu.log")

# The engine bench, then if it fails (not by running out of time) once without CUDA graphs and once more with
# torch ops instead of the Triton kernels too, so that one failing piece still leaves figures of the rest; the
# serving step runs in the mode that worked. Each attempt's log is kept (bench-engine-<mode>.log).
modes=("graphs" "eager" "torch")
mode_flags=("" "--enforce-eager" "--enforce-eager")
mode_env=("" "" "HEXGEN_TRITON=0")
for i in "${!modes[@]}"; do
    (( i > 0 && BUDGET_S - SECONDS < 230 )) && break
    echo "== hexgen bench engine --shape $SHAPE ${BENCH_ARGS[*]} ${mode_flags[$i]} ${mode_env[$i]}"
    rm -rf "$MODEL_DIR"
    # shellcheck disable=SC2086
    env ${mode_env[$i]} timeout "$(cap 220 110)" $PYTHON -m hexgen.cli bench engine --shape "$SHAPE" \
        "${BENCH_ARGS[@]}" ${mode_flags[$i]} --save-model "$MODEL_DIR" --markdown "$OUT/bench-engine.md" \
        > "$OUT/bench-engine-${modes[$i]}.log" 2>&1
    bench_rc=$?
    tail -5 "$OUT/bench-engine-${modes[$i]}.log"
    (( bench_rc == 0 || bench_rc == 124 )) && break
done
bench_mode=${modes[$i]}
export SERVE_ARGS="${mode_flags[$i]}"
[[ -n "${mode_env[$i]}" ]] && export "${mode_env[$i]}"

echo "== hexgen serve --device $DEVICE (random $SHAPE) under hexgen bench serve"
bash scripts/serve_check.sh "$PYTHON" "$MODEL_DIR" "$DEVICE" "$OUT" "$(cap 110 90)" "${SERVE_LOADS[@]}"
serve_rc=$?

echo "== where a decode step's time goes (graph replay against the rest; not part of the pass / fail)"
# shellcheck disable=SC2086
timeout "$(cap 80 40)" $PYTHON scripts/gpu_step_breakdown.py "$MODEL_DIR" --device "$DEVICE" $BREAKDOWN_ARGS \
    --markdown "$OUT/step-breakdown.md" > "$OUT/step-breakdown.log" 2>&1 || tail -5 "$OUT/step-breakdown.log"

echo "== kernels beside torch"
timeout "$(cap 45 0)" $PYTHON scripts/kernel_bench.py --markdown "$OUT/kernels.md" 2>&1 | tail -20
kernels_rc=${PIPESTATUS[0]}

if (( BUDGET_S - SECONDS > 40 )); then
    # --model: the per-layer and per-sequence overheads fitted on the benchmark model's own decode steps
    echo "== hexgen profile --device $DEVICE --model (random $SHAPE) (for hexgen plan / simulate; commit as" \
        "examples/profiles/)"
    timeout "$(cap 110 0)" $PYTHON -m hexgen.cli profile --device "$DEVICE" --model "$MODEL_DIR" \
        -o "$OUT/profile-$DEVICE.yaml" > "$OUT/profile.log" 2>&1 && cat "$OUT/profile-$DEVICE.yaml" \
        || tail -5 "$OUT/profile.log"
fi
rm -rf "$(dirname "$MODEL_DIR")"

echo "== results after ${SECONDS} s (pytest exit $tests_rc, $tests_failed failed; engine bench exit $bench_rc" \
    "in mode $bench_mode;" \
    "serving exit $serve_rc; kernel bench exit $kernels_rc; files in $OUT)"
cat "$OUT/bench-engine.md" 2>/dev/null || tail -40 "$OUT/bench-engine-$bench_mode.log"
cat "$OUT/serve.md" 2>/dev/null
cat "$OUT/kernels.md" 2>/dev/null
cat "$OUT/step-breakdown.md" 2>/dev/null
grep -h "attention tiles" "$OUT"/bench-engine-*.log "$OUT"/serve*.log 2>/dev/null | sort | uniq -c  # each rank's timed choice
# At most 8 files come back from a device call: the logs and JSON travel as one archive.
(cd "$OUT" && tar czf logs.tar.gz --remove-files -- *.log *.json 2>/dev/null)
[[ $tests_failed -eq 0 && $tests_rc -ne 124 && $bench_rc -eq 0 && $bench_mode == graphs && $serve_rc -eq 0 \
    && $kernels_rc -eq 0 ]]
