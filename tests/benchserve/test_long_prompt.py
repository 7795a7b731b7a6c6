"""scripts/long_prompt.py: a prompt of exactly the tokens asked for, the same for the same seed."""

from __future__ import annotations

from script_loader import load_script
from transformers import AutoTokenizer

from hexgen.engine.checkpoint import resolve_model


def test_prompt_has_the_tokens_asked_for_and_is_seeded():
    script = load_script("long_prompt.py")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m", progress=False).directory))
    for tokens in (1, 37, 1000):
        text = script.long_prompt(tokens)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens
    assert script.long_prompt(200) == script.long_prompt(200)
    assert script.long_prompt(200, seed=1) != script.long_prompt(200)


def test_count_prints_that_many_prompts_one_a_line(capsys, monkeypatch):
    script = load_script("long_prompt.py")
    monkeypatch.setattr("sys.argv", ["long_prompt.py", "40", "--count", "3", "--seed", "5"])
    script.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [script.long_prompt(40, seed=s) for s in (5, 6, 7)] and len(set(lines)) == 3
