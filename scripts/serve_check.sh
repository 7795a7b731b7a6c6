#!/usr/bin/env bash
# `hexgen serve` of a checkpoint folder on one device (one replica, one stage, bf16) under closed-loop loads of
# `hexgen bench serve`; then the server is stopped with everything it started. Used by scripts/gpu_check.sh.
#
#   bash scripts/serve_check.sh PYTHON MODEL_DIR DEVICE OUT LIMIT_S "STREAMS REQUESTS TOKENS [LOGPROBS]" ...
#
# A load's optional fourth field asks every request for log-probabilities with that many alternatives.
# Writes under OUT: serve.log (the server), serve-<streams>[-lp<N>].json / .log (each load) and serve.md (the table).
# SERVE_ARGS in the environment: more `hexgen serve` flags (e.g. --enforce-eager); SERVE_DTYPE: the dtype
# (default bfloat16).
# Exit 0 only when the server came up, every load ran without a failed request, and nothing was left behind.
set -uo pipefail
if (( $# < 6 )); then
    echo "usage: bash scripts/serve_check.sh PYTHON MODEL_DIR DEVICE OUT LIMIT_S 'STREAMS REQUESTS TOKENS' ..." >&2
    exit 2
fi
PYTHON=$1 MODEL_DIR=$2 DEVICE=$3 OUT=$4 LIMIT_S=$5
shift 5
PORT="${SERVE_PORT:-8311}"
DTYPE="${SERVE_DTYPE:-bfloat16}"
deadline=$(( SECONDS + LIMIT_S ))
layers=$($PYTHON -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' \
    "$MODEL_DIR/config.json") || exit 1
if [[ $DEVICE == cuda ]]; then  # no plan: the default CUDA plan, one replica on the one GPU left visible
    export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
    plan_args=()
else  # one process (the CPU's default plan is the five-process demo)
    plan="$OUT/plan-one-device.json"
    printf '{"model": "%s", "replicas": [{"stages": [{"machine": "localhost", "gpus": [0], "tp": 1, "layers": [0, %d]}]}]}\n' \
        "$MODEL_DIR" "$layers" > "$plan"
    plan_args=(--plan "$plan")
fi

# In its own session, so that whatever is left of it at the end can be stopped as one process group.
setsid $PYTHON -m hexgen.cli serve --model "$MODEL_DIR" "${plan_args[@]}" --device "$DEVICE" --dtype "$DTYPE" \
    --host 127.0.0.1 --port "$PORT" --max-batch 64 --served-model-name random ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1 &
server=$!
stop_server() {
    kill -TERM "$server" 2>/dev/null  # the server stops its ranks itself
    for _ in $(seq 60); do pgrep -g "$server" > /dev/null || break; sleep 0.5; done  # its whole group, 30 s
    if pgrep -g "$server" > /dev/null; then
        echo "left behind after the server stopped (killed): $(pgrep -g "$server" | tr '\n' ' ')"
        pkill -KILL -g "$server"
        return 1
    fi
}

remaining() { echo $(( deadline - SECONDS > 1 ? deadline - SECONDS : 1 )); }
until grep -q "ready on" "$OUT/serve.log"; do
    if ! kill -0 "$server" 2>/dev/null || (( SECONDS >= deadline )); then
        echo "the server did not become ready in ${SECONDS} s:"
        tail -5 "$OUT/serve.log"
        stop_server
        exit 1
    fi
    sleep 1
done
echo "server ready after ${SECONDS} s"

rc=0
files=()
for load in "$@"; do
    read -r streams requests tokens logprobs <<< "$load"
    name="serve-$streams${logprobs:+-lp$logprobs}"
    echo "-- $streams streams, $requests requests of $tokens tokens${logprobs:+, logprobs $logprobs}"
    timeout "$(remaining)" $PYTHON -m hexgen.cli bench serve --url "http://127.0.0.1:$PORT/v1" --model random \
        --concurrency "$streams" --num-requests "$requests" --max-tokens "$tokens" --ignore-eos --warmup 2 \
        ${logprobs:+--logprobs "$logprobs"} --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || rc=1
    grep -E "TTFT|TPOT|ok / failed|output tokens/s" "$OUT/$name.log" || tail -3 "$OUT/$name.log"
    [[ -f "$OUT/$name.json" ]] && files+=("$OUT/$name.json")
done
stop_server || rc=1
(( ${#files[@]} == $# )) || rc=1
(( ${#files[@]} )) || exit 1

# The table (serve.md); exit 1 when a load had a failed request.
$PYTHON - "$DEVICE" "$DTYPE" "${files[@]}" > "$OUT/serve.md" <<'EOF' || rc=1
import json, sys

print(f"`hexgen serve --device {sys.argv[1]} --dtype {sys.argv[2]} --max-batch 64` (one replica, one stage) under "
      "`hexgen bench serve --ignore-eos`\n")
print("| streams | requests ok / failed | output tok/s | TPOT p50 (ms) | TPOT p90 (ms) | TTFT p50 (ms) "
      "| engine step (ms) | tokens / step | driver busy |")
print("|---|---|---|---|---|---|---|---|---|")
failed = 0
for path in sys.argv[3:]:
    document = json.load(open(path))
    config, summary = document["config"], document["summary"]
    tpot, ttft = summary["tpot_s"], summary["ttft_s"]
    ms = lambda value: "-" if value is None else f"{1000 * value:.1f}"  # noqa: E731
    engine = summary.get("engine") or {}  # the server's own step figures (hexgen/benchserve/server_engine.py)
    step = f"{engine['mean_step_ms']:.1f}" if engine else "-"
    tokens = f"{engine['tokens_per_step']:.1f}" if engine else "-"
    busy = f"{engine['busy_fraction']:.0%}" if engine else "-"
    streams = str(config["concurrency"])
    if config.get("logprobs") is not None:
        streams += f" (logprobs {config['logprobs']})"
    print(f"| {streams} | {summary['completed']} / {summary['failed']} | "
          f"{summary['output_throughput_tps']:.0f} | {ms(tpot['p50'])} | {ms(tpot['p90'])} | {ms(ttft['p50'])} "
          f"| {step} | {tokens} | {busy} |")
    failed += summary["failed"]
sys.exit(1 if failed else 0)
EOF
cat "$OUT/serve.md"
exit $rc
