"""`hexgen generate` takes its prompt from --prompt/--chat, from piped standard input, or says what is missing."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys

import pytest

from hexgen.commands.generate import read_prompts
from hexgen.errors import UserError


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def hexgen_generate(args: list[str], stdin) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hexgen.cli", "generate", *args], stdin=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("prompts", "chats", "piped", "expected"), [
    ([], [], "Once upon a time\n", (["Once upon a time"], [])),  # piped, no flag: a raw prompt
    (["-"], [], "line one\nline two\r\n", (["line one\nline two"], [])),
    (["a", "-"], ["c"], "b", (["a", "b"], ["c"])),
    ([], ["-"], "What is 2+2?\n", ([], ["What is 2+2?"])),
    (["given"], [], "unread", (["given"], [])),  # flags win; stdin is left alone
])
def test_prompts_from_stdin(prompts, chats, piped, expected):
    assert read_prompts(prompts, chats, io.StringIO(piped)) == expected


@pytest.mark.parametrize(("prompts", "chats", "stdin", "message"), [
    ([], [], Terminal(""), "no prompt: give --prompt TEXT or --chat TEXT, or pipe the text into standard input"),
    ([], [], None, "no prompt: give --prompt TEXT or --chat TEXT, or pipe the text into standard input"),
    ([], [], io.StringIO("\n"), "--prompt reads standard input, which is empty"),
    ([], ["-"], io.StringIO(""), "--chat reads standard input, which is empty"),
    (["-"], ["-"], io.StringIO("x"), "but --prompt - and --chat - both ask for it"),
])
def test_missing_prompt_is_named(prompts, chats, stdin, message):
    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        read_prompts(prompts, chats, stdin)


def test_no_prompt_at_a_terminal_is_one_line():
    """At a terminal, before any model is loaded: one error line, exit code 2."""
    leader, follower = pty.openpty()
    try:
        done = hexgen_generate(["--max-new-tokens", "2"], stdin=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("hexgen generate: error: no prompt: give --prompt TEXT or --chat TEXT, "
                           "or pipe the text into standard input\n")


@pytest.mark.parametrize("flag", ["--prompt", "--chat"])
def test_piped_text_generates_like_the_flag(flag, tokenizer_model_dir):
    common = ["--model", str(tokenizer_model_dir), "--max-new-tokens", "4", "--ignore-eos"]
    text = "The weather today is"
    reference = hexgen_generate([*common, flag, text], stdin=subprocess.DEVNULL)
    assert reference.returncode == 0, reference.stderr
    piped_args = [*common, flag, "-"] if flag == "--chat" else common  # no flag at all reads a raw prompt
    piped = subprocess.run([sys.executable, "-m", "hexgen.cli", "generate", *piped_args], input=text + "\n",
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == reference.stdout != ""
