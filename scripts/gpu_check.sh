#!/usr/bin/env bash
# The whole GPU check in one device call (under 8 minutes on an H200): gpu-marked tests, each Triton kernel
# beside torch (scripts/kernel_bench.py), `hexgen bench engine --device cuda` on a random-weight
# Llama-3-8B-shaped model it builds itself, then `hexgen profile` of the GPU for the planner (not part of the
# pass / fail: a bonus if time is left).
#
#   bash scripts/gpu_check.sh --fetch-wheels   here, once: the Python packages the GPU image lacks -> .whl/
#   bash scripts/gpu_check.sh                  on the GPU machine (carry .whl); tables and logs under $OUT
#   bash scripts/gpu_check.sh --dry-run        here, on CPU: the same steps on a tiny shape, in about a minute
#
# The GPU image has its own torch, transformers and triton (see ../shared/reference/gpu-h200.md): the
# checkout goes on PYTHONPATH, hexgen is installed without its pinned dependencies (only for its metadata),
# and only the packages the image lacks travel, as wheels. Device call: carry [".whl"], timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/.."

# Pinned as in pyproject.toml / the venv; --no-deps, so every missing dependency is named.
WHEELS="pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  uvicorn==0.54.0 gguf==0.19.0 pyzmq==27.3.0"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
fi

PYTHON=python3
SHAPE=llama-3-8b
BENCH_ARGS=(--device cuda --dtype bfloat16)
PROFILE_DEVICE=cuda
if [[ "${1:-}" == "--dry-run" ]]; then
    PROFILE_DEVICE=cpu
    PYTHON=.venv/bin/python
    SHAPE=tiny
    BENCH_ARGS=(--device cpu --dtype bfloat16 --batch-sizes 1 4 --new-tokens 4 --repeats 1 --layout 1)
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash scripts/gpu_check.sh [--fetch-wheels | --dry-run]" >&2
    exit 2
fi
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD"
if [[ "${1:-}" != "--dry-run" ]]; then
    if [[ -d .whl ]]; then
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:$PWD"
    fi
    # The CLI reads hexgen's package metadata (--version, description); pins are for the CPU machines: no deps.
    $PYTHON -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PYTHON -c 'import torch, transformers, importlib.util as u
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(), "| transformers", transformers.__version__,
      "| triton", __import__("triton").__version__ if u.find_spec("triton") else "absent")'

echo "== gpu-marked tests"
timeout 150 $PYTHON -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests 2>&1 \
    | tee "$OUT/pytest-gpu.log" | tail -40
tests_rc=${PIPESTATUS[0]}
# A module the GPU image cannot import (e.g. ray's tests) is a collection error, not a failed GPU test.
tests_failed=$(grep -c '^FAILED' "$OUT/pytest-gpu.log")

echo "== kernels beside torch"
timeout 60 $PYTHON scripts/kernel_bench.py --markdown "$OUT/kernels.md" 2>&1 | tail -20
kernels_rc=${PIPESTATUS[0]}

echo "== hexgen bench engine --shape $SHAPE ${BENCH_ARGS[*]}"
timeout 240 $PYTHON -m hexgen.cli bench engine --shape "$SHAPE" "${BENCH_ARGS[@]}" --markdown "$OUT/bench-engine.md" \
    > "$OUT/bench-engine.log" 2>&1
bench_rc=$?
tail -5 "$OUT/bench-engine.log"

echo "== hexgen profile --device $PROFILE_DEVICE (for hexgen plan / simulate; commit as examples/profiles/)"
timeout 75 $PYTHON -m hexgen.cli profile --device "$PROFILE_DEVICE" -o "$OUT/profile-$PROFILE_DEVICE.yaml" \
    > "$OUT/profile.log" 2>&1 && cat "$OUT/profile-$PROFILE_DEVICE.yaml" || tail -5 "$OUT/profile.log"

echo "== results (pytest exit $tests_rc, $tests_failed failed; kernel bench exit $kernels_rc;" \
    "engine bench exit $bench_rc; files in $OUT)"
cat "$OUT/kernels.md" 2>/dev/null
cat "$OUT/bench-engine.md" 2>/dev/null || tail -40 "$OUT/bench-engine.log"
[[ $tests_failed -eq 0 && $tests_rc -ne 124 && $kernels_rc -eq 0 && $bench_rc -eq 0 ]]
