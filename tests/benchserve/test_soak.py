"""scripts/soak.py's judgement of answers: hand-made answers against hand-made references (a greedy request's every
choice against the one answer alone, a seeded request's choice i against its own answer alone, log-probabilities
within the tolerance, a stream cut short only where its text so far was right), the requests it makes (seeded,
reproducible, each kind present), and their bodies for both endpoints."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_script"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["soak_script"]


def answer(soak, texts, finishes=None, logprobs=None, status=200):
    finishes = finishes or ["length"] * len(texts)
    logprobs = logprobs or [[] for _ in texts]
    return soak.Answer(0, status, list(texts), list(finishes), [list(lp) for lp in logprobs])


def test_greedy_choices_each_equal_the_one_answer_alone(soak):
    alone = answer(soak, ["a b c"], logprobs=[[-0.5, -1.0]])
    assert soak.agrees(answer(soak, ["a b c", "a b c"], logprobs=[[-0.5, -1.0], [-0.5, -1.0]]), alone, 1e-4)
    assert not soak.agrees(answer(soak, ["a b c", "a b d"], logprobs=[[-0.5, -1.0], [-0.5, -1.0]]), alone, 1e-4)
    assert not soak.agrees(answer(soak, ["a b c"], ["stop"], [[-0.5, -1.0]]), alone, 1e-4)  # finish reason
    assert soak.agrees(answer(soak, ["a b c"], logprobs=[[-0.50005, -1.0]]), alone, 1e-4)
    echoed = answer(soak, ["p a"], logprobs=[[None, -2.0]])  # an echoed prompt's first token has none
    assert soak.agrees(answer(soak, ["p a"], logprobs=[[None, -2.0]]), echoed, 1e-4)
    assert not soak.agrees(answer(soak, ["p a"], logprobs=[[-0.1, -2.0]]), echoed, 1e-4)
    assert not soak.agrees(echoed, answer(soak, ["p a"], logprobs=[[-0.1, -2.0]]), 1e-4)
    assert not soak.agrees(answer(soak, ["a b c"], logprobs=[[-0.5002, -1.0]]), alone, 1e-4)
    assert not soak.agrees(answer(soak, ["a b c"], logprobs=[[-0.5]]), alone, 1e-4)  # a token's missing


def test_a_difference_is_located(soak):
    alone = answer(soak, ["a b c"], logprobs=[[-0.5, -1.0]])
    assert soak.difference(answer(soak, ["a b x"], logprobs=[[-0.5, -1.0]]), alone) == \
        "choice 0: the text differs from character 4"
    assert soak.difference(answer(soak, ["a b c"], logprobs=[[-0.5, -1.1]]), alone) == \
        "choice 0: token 1's log-probability -1.1 against -1.0 alone"
    assert soak.difference(answer(soak, ["a b c"], ["stop"], [[-0.5, -1.0]]), alone) == \
        "choice 0: finish reason stop against length alone"


def test_seeded_choice_i_is_compared_with_its_own_answer_alone(soak):
    alone = answer(soak, ["x y", "p q"])  # choice 0 alone with seed s, choice 1 with seed s + 1
    assert soak.agrees(answer(soak, ["x y", "p q"]), alone, 1e-4)
    assert not soak.agrees(answer(soak, ["p q", "x y"]), alone, 1e-4)  # swapped choices
    assert not soak.agrees(answer(soak, ["x y", "x y"]), alone, 1e-4)
    assert not soak.agrees(answer(soak, ["x y"]), alone, 1e-4)  # a choice missing


def test_a_cut_stream_counts_only_where_its_text_so_far_was_right(soak):
    alone = answer(soak, ["one two three", "four five"])
    assert soak.cut_short(answer(soak, ["one tw", "four"], status=599), alone)
    assert not soak.cut_short(answer(soak, ["one tw", "five"], status=599), alone)
    assert not soak.cut_short(answer(soak, ["one tw", "four"], status=200), alone)  # not cut: judged by agrees


def test_requests_are_seeded_and_carry_every_kind(soak):
    first, again = soak.make_requests(7, 400, 1000), soak.make_requests(7, 400, 1000)
    assert first == again
    assert first != soak.make_requests(8, 400, 1000)
    for label, test in {"sampled": lambda r: r.seed is not None and r.temperature > 0,
                        "greedy": lambda r: r.seed is None and r.temperature == 0, "chat": lambda r: r.chat,
                        "two choices": lambda r: r.n == 2, "penalties": lambda r: r.presence_penalty != 0,
                        "logit bias": lambda r: bool(r.logit_bias), "cancelled": lambda r: r.cancel_after_chunks,
                        "stop": lambda r: r.stop, "logprobs": lambda r: r.logprobs is not None,
                        "echo": lambda r: r.echo}.items():
        assert 10 <= sum(1 for r in first if test(r)) <= 320, label  # present, and not every request
    assert all(0 <= int(token) < 1000 for r in first for token in r.logit_bias or {})


def test_bodies_of_both_endpoints(soak):
    r = soak.SoakRequest(3, "hello there", 9, True, None, 0.0, 2, " stop", 2, chat=True, temperature=0.8, seed=11)
    body = r.body("m", stream=False, n=1, seed=12)
    assert body["messages"] == [{"role": "user", "content": "hello there"}] and "prompt" not in body
    assert (body["logprobs"], body["top_logprobs"], body["seed"], body["n"]) == (True, 2, 12, 1)
    completion = soak.SoakRequest(3, "hello there", 9, False, None, 0.0, 1, None, None).body("m", True, 1, None)
    assert (completion["prompt"], completion["logprobs"], completion["temperature"]) == ("hello there", None, 0.0)
    assert "messages" not in completion and completion["echo"] is False
    assert soak.choice_text_and_logprobs({"delta": {"content": "hi"}, "logprobs": {"content": [{"logprob": -1.5}]}},
                                         chat=True) == ("hi", [-1.5])
    assert soak.choice_text_and_logprobs({"text": "hi", "logprobs": {"token_logprobs": [-0.25]}},
                                         chat=False) == ("hi", [-0.25])


def test_a_kill_hits_one_rank_or_every_replica_on_the_lost_machine(soak, monkeypatch):
    """--kill-rank R/S/K names one rank (its replica is the one hit); --kill-machine every process of that Ray
    node, hitting each replica with a stage there."""
    import argparse
    import signal

    from hexgen.raycluster import node

    def rank(pid):
        return {"pid": pid}

    status = {"replicas": [
        {"index": 0, "stages": [{"machine": "a", "ranks": [rank(11)]}, {"machine": "b", "ranks": [rank(12)]}]},
        {"index": 1, "stages": [{"machine": "c", "ranks": [rank(21), rank(22), rank(23)]}]},
        {"index": 2, "stages": [{"machine": "b", "ranks": [rank(31)]}]}]}
    args = argparse.Namespace(kill_signal="KILL", kill_machine=None, kill_rank="1/0/-1", kill_rank_after=30.0)
    kill, replicas, pids = soak.planned_kill(args, status)
    assert (kill.pids, kill.after_s, kill.signal, replicas, pids) == ((23,), 30.0, signal.SIGKILL, [1], [21, 22, 23])
    monkeypatch.setattr(node, "read_record", lambda machine: f"record of {machine}")
    monkeypatch.setattr(node, "node_pids", lambda record: {"record of b": [7, 8, 12, 31]}[record])
    kill, replicas, pids = soak.planned_kill(argparse.Namespace(**{**vars(args), "kill_machine": "b"}), status)
    assert (kill.pids, replicas, pids) == ((7, 8, 12, 31), [0, 2], [11, 12, 31])
