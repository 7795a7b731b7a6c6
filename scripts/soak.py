"""Soak `hexgen serve`: hundreds of concurrent requests with shared prefixes, long prompts, streamed and not, some
cancelled by their client, some with two choices, stop strings, log-probabilities, penalties, a logit bias or the
prompt echoed, some to the chat endpoint, greedy or sampled with a seed, against a server under the flags you give
(a small --memory-gb forces preemptions, --speculative-tokens turns drafts on; any rank can be killed or hung
mid-run, or over Ray a whole machine lost; --rounds repeats the load on the same server and reports its memory);
then every answer that finished is compared with the same request run alone, one at a time, on a reference server
(one process, batch 1, no prefix cache).

    .venv/bin/python scripts/soak.py --requests 200 -- --plan examples/plans/local-default.json --memory-gb 0.66

Everything runs in float32, where an answer does not depend on what shares its steps (tests/engine), so any
difference is a bug. The reference answers are kept in --reference-file (by model, seed and count) and reused.
Exit status 1 when an answer differs, a request failed without cause (only streams cut by a killed rank may end
with an error), a replica that is up still holds blocks once idle, or a process of either server is left."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hexgen.launch.lifetime import free_port

REPO = Path(__file__).resolve().parent.parent
HEXGEN = [sys.executable, "-m", "hexgen.cli"]
WORDS = ("river stone cloud apple table seven orange music window garden paper light quiet north engine silver "
         "forest bridge yellow number winter summer animal planet letter doctor market castle story").split()
PREFIXES = 4  # prompts that share a beginning (system prompts, earlier turns) draw it from these
DEFAULT_PREFIX_WORDS = (150, 500)  # words in each of those beginnings (--prefix-words)
REQUEST_KINDS = 4  # make_requests' version: saved reference answers of another version are not reused
# float32 log-probabilities of the same tokens: other batches and chunks differ by a few 1e-5, another TP layout by
# more (a TP group sums its partial products in another order): one token of one request on the default plan's TP 3
# stage, served alone at batch 1, came 1.9e-4 from the one-process reference (2026-12-02), the rest within 4e-5.
LOGPROB_TOLERANCE = 5e-4
console = Console(stderr=True)


@dataclass(frozen=True)
class SoakRequest:
    index: int
    prompt: str
    max_tokens: int
    stream: bool
    cancel_after_chunks: int | None  # the client closes its stream after this many chunks
    delay_s: float  # sent this long after the run starts
    n: int  # choices (greedy: each must equal the answer alone; seeded: choice i the request alone with seed + i)
    stop: str | None  # a stop string
    logprobs: int | None  # alternatives per token asked for
    chat: bool = False  # /v1/chat/completions with the prompt as the user's message
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # every sampled request has one: its tokens must not depend on what shares its steps
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    echo: bool = False  # completions: the prompt comes back before the answer (with its log-probabilities, if asked)

    def body(self, model: str, stream: bool, n: int, seed: int | None) -> dict:
        body = {"model": model, "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": seed, "stream": stream, "n": n, "stop": self.stop,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": self.logit_bias}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
            if self.logprobs is not None:
                body.update(logprobs=True, top_logprobs=self.logprobs)
        else:
            body.update(prompt=self.prompt, logprobs=self.logprobs, echo=self.echo)
        return body


def make_requests(seed: int, count: int, vocab_size: int, prefix_words: tuple[int, int] = DEFAULT_PREFIX_WORDS
                  ) -> list[SoakRequest]:
    """60% share one of PREFIXES beginnings of `prefix_words` words, then 3-300 words of their own; half streamed,
    15% of the streams cancelled; 15% ask for 2 choices, 20% stop at a word, 20% ask for log-probabilities; 15% go
    to the chat endpoint; 30% sample (temperature, top-p, top-k) with a seed; 15% carry presence and frequency
    penalties, 10% a logit bias on a few token ids (a ban or a push); 10% of the completions echo their prompt."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choices(WORDS, k=rng.randint(*prefix_words))) for _ in range(PREFIXES)]
    out = []
    for i in range(count):
        tail = " ".join(rng.choices(WORDS, k=rng.randint(3, 300)))
        prompt = f"{rng.choice(prefixes)} {tail}" if rng.random() < 0.6 else tail
        stream = rng.random() < 0.5
        cancel = rng.randint(1, 5) if stream and rng.random() < 0.15 else None
        n = 2 if rng.random() < 0.15 else 1
        stop = f" {rng.choice(WORDS)}" if rng.random() < 0.2 else None
        logprobs = rng.randint(0, 3) if rng.random() < 0.2 else None
        sampling = {}
        if rng.random() < 0.3:
            sampling = {"temperature": rng.choice((0.5, 0.8, 1.0, 1.3)), "top_p": rng.choice((1.0, 0.95, 0.8)),
                        "top_k": rng.choice((0, 0, 40, 5)), "seed": rng.randrange(2**63)}
        if rng.random() < 0.15:
            sampling.update(presence_penalty=rng.choice((-0.5, 0.7, 1.5)), frequency_penalty=rng.choice((0.3, 1.0)))
        if rng.random() < 0.1:
            sampling["logit_bias"] = {str(rng.randrange(vocab_size)): rng.choice((-100.0, -5.0, 4.0, 8.0))
                                      for _ in range(rng.randint(1, 4))}
        chat = rng.random() < 0.15
        echo = not chat and rng.random() < 0.1
        out.append(SoakRequest(i, prompt, rng.randint(4, 64), stream, cancel, rng.random() * 2.0, n, stop, logprobs,
                               chat=chat, echo=echo, **sampling))
    return out


@dataclass
class Answer:
    index: int
    status: int  # HTTP status; 599: a stream that ended with an error event
    texts: list[str] = field(default_factory=list)  # by choice
    finish_reasons: list[str | None] = field(default_factory=list)
    logprobs: list[list[float | None]] = field(default_factory=list)  # each choice's tokens', if asked
    cancelled: bool = False
    error: str = ""


def choice_text_and_logprobs(choice: dict, chat: bool) -> tuple[str, list[float]]:
    """A choice's (piece of) text and its tokens' log-probabilities, from either endpoint, streamed or not."""
    logprobs = choice.get("logprobs") or {}
    if chat:
        message = choice.get("delta") or choice.get("message") or {}
        return message.get("content") or "", [t["logprob"] for t in logprobs.get("content") or []]
    return choice["text"], logprobs.get("token_logprobs") or []


async def ask(client: httpx.AsyncClient, url: str, model: str, r: SoakRequest, alone: bool,
              choice: int = 0) -> Answer:
    """One completion; alone: the reference's way, one choice (`choice`: with the seed that choice draws with), not
    streamed, not cancelled, not delayed."""
    stream = r.stream and not alone
    n = 1 if alone else r.n
    seed = None if r.seed is None else r.seed + (choice if alone else 0)
    body = r.body(model, stream, n, seed)
    endpoint = f"{url}/v1/chat/completions" if r.chat else f"{url}/v1/completions"
    answer = Answer(r.index, 200, [""] * n, [None] * n, [[] for _ in range(n)])

    def take(choice: dict) -> None:
        i = choice["index"]
        text, logprobs = choice_text_and_logprobs(choice, r.chat)
        answer.texts[i] += text
        answer.finish_reasons[i] = choice["finish_reason"] or answer.finish_reasons[i]
        answer.logprobs[i] += logprobs

    if not alone:
        await asyncio.sleep(r.delay_s)
    if not stream:
        response = await client.post(endpoint, json=body)
        if response.status_code != 200:
            return Answer(r.index, response.status_code, error=response.text[:300])
        for choice in response.json()["choices"]:
            take(choice)
        return answer
    chunks = 0
    async with client.stream("POST", endpoint, json=body) as response:
        if response.status_code != 200:
            return Answer(r.index, response.status_code, error=(await response.aread()).decode()[:300])
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                answer.status, answer.error = 599, event["error"]["message"][:300]
                return answer
            for choice in event["choices"]:
                take(choice)
            chunks += 1
            if r.cancel_after_chunks is not None and chunks >= r.cancel_after_chunks:
                answer.cancelled = True
                return answer  # leaving the block closes the connection: the server aborts the sequence
    return answer


async def ask_alone(client: httpx.AsyncClient, url: str, model: str, r: SoakRequest) -> Answer:
    """The reference answer: greedy, the request alone once (each of its choices must equal it); seeded, each choice
    alone with its own seed."""
    if r.seed is None:
        return await ask(client, url, model, r, alone=True)
    parts = [await ask(client, url, model, r, alone=True, choice=i) for i in range(r.n)]
    failed = next((p for p in parts if p.status != 200), None)
    return failed or Answer(r.index, 200, [p.texts[0] for p in parts], [p.finish_reasons[0] for p in parts],
                            [p.logprobs[0] for p in parts])


def alone_choice(alone: Answer, i: int) -> int:
    """Which choice of the reference answer choice i is compared with."""
    return i if len(alone.texts) > 1 else 0


def close(a: float | None, b: float | None, tolerance: float) -> bool:
    """Two log-probabilities within `tolerance`; None (an echoed prompt's first token has none) only equals None."""
    return a is None and b is None or a is not None and b is not None and abs(a - b) <= tolerance


def agrees(answer: Answer, alone: Answer, tolerance: float) -> bool:
    """Every choice's text and finish reason as alone, and its log-probabilities within `tolerance`."""
    return difference(answer, alone, tolerance) is None


def difference(answer: Answer, alone: Answer, tolerance: float = LOGPROB_TOLERANCE) -> str | None:
    """Where an answer first differs from the one alone (text, finish reason or a log-probability); None if not."""
    if len(answer.texts) != len(alone.texts) and len(alone.texts) != 1:
        return f"{len(answer.texts)} choices against {len(alone.texts)} alone"
    for i, (text, finish, lp) in enumerate(zip(answer.texts, answer.finish_reasons, answer.logprobs, strict=True)):
        j = alone_choice(alone, i)
        if text != alone.texts[j]:
            shorter = min(len(text), len(alone.texts[j]))
            at = next((k for k in range(shorter) if text[k] != alone.texts[j][k]), shorter)
            return f"choice {i}: the text differs from character {at}"
        if finish != alone.finish_reasons[j]:
            return f"choice {i}: finish reason {finish} against {alone.finish_reasons[j]} alone"
        if len(lp) != len(alone.logprobs[j]):
            return f"choice {i}: {len(lp)} log-probabilities against {len(alone.logprobs[j])} alone"
        for k, (x, y) in enumerate(zip(lp, alone.logprobs[j], strict=True)):
            if not close(x, y, tolerance):
                return f"choice {i}: token {k}'s log-probability {x} against {y} alone"
    return None


def cut_short(answer: Answer, alone: Answer) -> bool:
    """A stream ended by an error after text that was right so far."""
    return answer.status == 599 and all(alone.texts[alone_choice(alone, i)].startswith(t)
                                        for i, t in enumerate(answer.texts))


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def resident_mib(pid: int) -> float:
    """A process's private resident memory (RssAnon: its heap, weights and KV pool, not the shared libraries' pages
    every process maps), MiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class ServerProcess:
    """`hexgen serve` in a process group of its own on a free loopback port."""

    def __init__(self, flags: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([*HEXGEN, "serve", "--host", "127.0.0.1", "--port", str(self.port), *flags],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 600) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hexgen serve exited with {self.proc.returncode}: see {self.log}")
            try:
                return self.status()
            except httpx.HTTPError:
                time.sleep(1)
        raise RuntimeError(f"hexgen serve not ready after {timeout_s:.0f} s: see {self.log}")

    def status(self) -> dict:
        response = httpx.get(f"{self.url}/status", timeout=10)
        response.raise_for_status()
        return response.json()

    def resident_mib(self, replicas: list[dict]) -> dict[str, float]:
        """Private resident memory of the server process and of each rank of its replicas that are up, MiB, by
        "server" and "replica R stage S rank K"."""
        memory = {"server": resident_mib(self.proc.pid)}
        for r in replicas:
            if r["status"] == "up":
                for s, stage in enumerate(r["stages"]):
                    for k, rank in enumerate(stage["ranks"]):
                        memory[f"replica {r['index']} stage {s} rank {k}"] = resident_mib(rank["pid"])
        return memory

    def stop(self) -> bool:
        """SIGTERM, then SIGKILL after 60 s; whether the whole group was gone by itself."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        deadline = time.monotonic() + 10  # the group's last processes may take a moment to exit after the server
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.5)
        os.killpg(self.proc.pid, signal.SIGKILL)  # what is still there was left behind
        return False


@dataclass(frozen=True)
class Kill:
    """What to hit partway through the load: these processes, with this signal, this many seconds in."""

    after_s: float
    pids: tuple[int, ...]
    signal: signal.Signals
    what: str  # in words, for the log


def rank_pids(replica: dict) -> list[int]:
    return [rank["pid"] for stage in replica["stages"] for rank in stage["ranks"]]


def planned_kill(args, status: dict) -> tuple[Kill, list[int], list[int]]:
    """The kill --kill-rank-after asks for, the indices of the replicas it hits and their ranks' processes."""
    how = signal.Signals[f"SIG{args.kill_signal}"]
    if args.kill_machine:
        from hexgen.raycluster.node import node_pids, read_record

        hit = [r for r in status["replicas"] if any(s["machine"] == args.kill_machine for s in r["stages"])]
        pids = tuple(node_pids(read_record(args.kill_machine)))
        kill = Kill(args.kill_rank_after, pids, how, f"the {len(pids)} processes of machine {args.kill_machine}")
    else:
        replica, stage, rank = (int(i) for i in args.kill_rank.split("/"))
        hit = [status["replicas"][replica]]
        pid = hit[0]["stages"][stage]["ranks"][rank]["pid"]
        kill = Kill(args.kill_rank_after, (pid,), how, f"rank process {pid}")
    return kill, [r["index"] for r in hit], [pid for r in hit for pid in rank_pids(r)]


async def run_load(url: str, model: str, requests: list[SoakRequest], concurrency: int, alone: bool,
                   kill: Kill | None = None) -> list[Answer]:
    """Every request, `concurrency` at a time (one at a time if alone); `kill` sends a rank, or every process of a
    machine, a signal partway (SIGKILL: they die; SIGSTOP: they hang, and the server must notice the silence)."""
    limit = asyncio.Semaphore(1 if alone else concurrency)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("reference, one at a time" if alone else "soak", total=len(requests))

        async def one(client, r):
            async with limit:
                answer = await (ask_alone(client, url, model, r) if alone else ask(client, url, model, r, False))
            progress.advance(task)
            return answer

        async def killer():
            await asyncio.sleep(kill.after_s)
            for pid in kill.pids:
                with contextlib.suppress(ProcessLookupError):  # one of a machine's processes that ended meanwhile
                    os.kill(pid, kill.signal)
            console.print(f"sent {kill.signal.name} to {kill.what} after {kill.after_s:.0f} s")

        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=httpx.Limits(max_connections=None)) as client:
            killing = asyncio.ensure_future(killer()) if kill else None
            answers = await asyncio.gather(*(one(client, r) for r in requests))
            if killing:
                await killing
    return list(answers)


def reference_answers(args, requests: list[SoakRequest], layers: int) -> dict[int, Answer]:
    key = {"model": args.model, "seed": args.seed, "requests": args.requests, "kinds": REQUEST_KINDS}
    if args.prefix_words != DEFAULT_PREFIX_WORDS:
        key["prefix_words"] = list(args.prefix_words)
    path = args.reference_file
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return {a["index"]: Answer(**a) for a in saved["answers"]}
    plan = args.work_dir / "reference-plan.json"
    plan.write_text(json.dumps({"model": args.model, "replicas": [
        {"stages": [{"machine": "localhost", "gpus": [0], "tp": 1, "layers": [0, layers]}]}]}))
    server = ServerProcess(["--model", args.model, "--plan", str(plan), "--dtype", "float32", "--max-batch", "1",
                            "--no-prefix-caching"], args.work_dir / "reference.log")
    try:
        name = server.wait_ready()["model"]
        answers = asyncio.run(run_load(server.url, name, requests, 1, alone=True))
    finally:
        server.stop()
    path.write_text(json.dumps({"key": key, "answers": [asdict(a) for a in answers]}))
    return {a.index: a for a in answers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--kill-rank", default="0/-1/-1", metavar="R/S/K",
                        help="which rank --kill-rank-after hits: replica R, its stage S, that stage's rank K "
                             "(Python indices; the default is replica 0's last rank, 0/0/0 its driver)")
    parser.add_argument("--kill-signal", choices=("KILL", "STOP"), default="KILL",
                        help="KILL: the rank (or machine) dies; STOP: it hangs, silent, until the server stops it "
                             "(a hung machine: until the soak ends, which then kills its processes)")
    parser.add_argument("--kill-rank-after", type=float, metavar="S",
                        help="send --kill-signal to the --kill-rank rank S s into the run (its requests fail over)")
    parser.add_argument("--kill-machine", metavar="NAME",
                        help="with `serve --ray`: hit every process of that machine's Ray node (as `hexgen node` "
                             "recorded it, under HEXGEN_STATE_DIR) instead of one rank, as if the machine were lost")
    parser.add_argument("--prefix-words", type=int, nargs=2, default=DEFAULT_PREFIX_WORDS, metavar=("LOW", "HIGH"),
                        help="words in each shared beginning (about a token a word): 2000 3500 makes prompts of "
                             "up to ~3,800 tokens, whole blocks by the hundred, prefilled in many chunks")
    parser.add_argument("--rounds", type=int, default=1,
                        help="send the requests this many times to the same server (each round against the same "
                             "answers alone); the resident memory after each round shows whether the server grows")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/hexgen-soak"))
    parser.add_argument("--reference-file", type=Path, help="default: WORK_DIR/reference-SEED-REQUESTS.json")
    parser.add_argument("serve_flags", nargs="*", help="after --: flags of the `hexgen serve` under test")
    args = parser.parse_args()
    if not 1 <= args.prefix_words[0] <= args.prefix_words[1]:
        parser.error(f"--prefix-words takes LOW <= HIGH, both at least 1, got {args.prefix_words}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.kill_machine and args.kill_rank_after is None:
        parser.error("--kill-machine needs --kill-rank-after (when to hit it)")
    if not re.fullmatch(r"-?\d+/-?\d+/-?\d+", args.kill_rank):
        parser.error(f"--kill-rank takes R/S/K (replica, stage, rank indices), got {args.kill_rank!r}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.prefix_words = tuple(args.prefix_words)
    words = "" if args.prefix_words == DEFAULT_PREFIX_WORDS else "-{}-{}".format(*args.prefix_words)
    args.reference_file = args.reference_file or args.work_dir / f"reference-{args.seed}-{args.requests}{words}.json"
    from hexgen.engine.checkpoint import resolve_model  # torch: only where the script runs

    spec = resolve_model(args.model).spec
    requests = make_requests(args.seed, args.requests, spec.vocab_size, args.prefix_words)
    reference = reference_answers(args, requests, spec.num_layers)

    server = ServerProcess(["--model", args.model, "--dtype", "float32", *args.serve_flags], args.work_dir / "soak.log")
    answers, memory_mib = [], []  # memory: each round's private MiB by process (ServerProcess.resident_mib)
    hit_replicas, hit_pids = [], []  # the replicas a kill hit, and their ranks' processes
    kill = None
    try:
        status = server.wait_ready()
        started = time.monotonic()
        for round_index in range(args.rounds):
            if args.kill_rank_after is not None and round_index == 0:
                kill, hit_replicas, hit_pids = planned_kill(args, status)
            answers += asyncio.run(run_load(server.url, status["model"], requests, args.concurrency, False,
                                            kill if round_index == 0 else None))
            time.sleep(3)  # heartbeats report the pools after the last sequences left
            replicas = server.status()["replicas"]
            memory_mib.append(server.resident_mib(replicas))
            # before the server stops: it must have stopped them, but for those of a hung machine, out of reach
            hung = kill.pids if kill and args.kill_machine and kill.signal == signal.SIGSTOP else ()
            lingering = [pid for pid in hit_pids if alive(pid) and pid not in hung]
        elapsed_s = time.monotonic() - started
    finally:
        clean_exit = server.stop()
        if kill and args.kill_machine and kill.signal == signal.SIGSTOP:
            for pid in kill.pids:  # the hung machine restarts: its processes end
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    (args.work_dir / "soak-answers.json").write_text(json.dumps([asdict(a) for a in answers]))
    (args.work_dir / "soak-memory.json").write_text(json.dumps(memory_mib, indent=1))
    finished = [a for a in answers if a.status == 200 and not a.cancelled]
    same = [a for a in finished if agrees(a, reference[a.index], LOGPROB_TOLERANCE)]
    differ = [a for a in finished if not agrees(a, reference[a.index], LOGPROB_TOLERANCE)]
    cut = [a for a in answers if args.kill_rank_after is not None and cut_short(a, reference[a.index])]
    failed = [a for a in answers if a.status != 200 and not any(a is c for c in cut)]
    cancelled = [a for a in answers if a.cancelled]
    held = [r["index"] for r in replicas if r["status"] == "up" and r["kv_blocks_used"]]
    not_down = [r["index"] for r in replicas if r["index"] in hit_replicas and r["status"] != "down"]

    table = Table(title=f"soak: {len(requests)} requests x {args.rounds} rounds, seed {args.seed}, "
                        f"concurrency {args.concurrency}, "
                        f"{elapsed_s:.0f} s; serve {' '.join(args.serve_flags)}")
    for column in ("answers", "count"):
        table.add_column(column)
    by_index = {r.index: r for r in requests}
    kinds = {"sampled with a seed": lambda r: r.seed is not None, "chat": lambda r: r.chat,
             "penalties": lambda r: bool(r.presence_penalty or r.frequency_penalty),
             "logit bias": lambda r: bool(r.logit_bias), "two choices": lambda r: r.n > 1, "echo": lambda r: r.echo}
    table.add_row("the same as alone", f"{len(same)}: " + ", ".join(
        f"{label} {sum(1 for a in same if test(by_index[a.index]))}" for label, test in kinds.items()))
    for label, rows in (("different", differ), ("cancelled by the client", cancelled),
                        ("streams cut by the kill", cut), ("failed otherwise", failed)):
        table.add_row(label, str(len(rows)))
    gaps = [abs(x - y) for a in same for i, lp in enumerate(a.logprobs)
            for x, y in zip(lp, reference[a.index].logprobs[alone_choice(reference[a.index], i)], strict=True)
            if x is not None]
    table.add_row("log-probabilities compared", f"{len(gaps)}, the largest difference {max(gaps, default=0):.2e}")
    table.add_row("private resident MiB after each round: server; ranks",
                  ", ".join(f"{m['server']:.0f}" for m in memory_mib) + "; "
                  + ", ".join(f"{sum(v for k, v in m.items() if k != 'server'):.0f}" for m in memory_mib)
                  + " (each rank's: WORK_DIR/soak-memory.json)")
    for r in replicas:
        table.add_row(f"replica {r['index']} ({r['status']})",
                      f"preemptions {r['preemptions']}, prefix-hit tokens {r['prefix_hit_tokens']}, drafts "
                      f"{r['accepted_draft_tokens']}/{r['draft_tokens']} accepted, peak batch {r['peak_running']}")
    Console().print(table)
    for a in (differ + failed)[:5]:
        console.print(f"request {a.index}: {a.status} {a.error or a.texts} | alone: {reference[a.index].texts!r}"
                      + (f"\n  {difference(a, reference[a.index])}" if a in differ else ""))
    problems = [f"{len(differ)} answers differ" if differ else "", f"{len(failed)} failed" if failed else "",
                f"replicas {held} hold blocks once idle" if held else "",
                "" if clean_exit else "processes of the server were left",
                f"hit replicas {not_down} are not down" if not_down else "",
                f"ranks {lingering} of the hit replicas still run" if hit_pids and lingering else ""]
    problems = [p for p in problems if p]
    console.print("; ".join(problems) if problems else "ok: every finished answer equals the request's alone")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
