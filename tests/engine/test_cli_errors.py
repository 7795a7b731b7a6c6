"""Bad input through `hexgen generate`: one actionable stderr line, exit code 2, no traceback, no process left."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from engine_helpers import run_cli
from safetensors.torch import load_file, save_file


def assert_user_error(args: list[str], fragment: str) -> str:
    code, out, err, left = run_cli(args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("hexgen generate: error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err and out == ""
    assert left == [], f"processes left behind: {left}"
    return lines[0]


@pytest.fixture(scope="module")
def broken_models(tokenizer_model_dir, tmp_path_factory):
    """Copies of the tokenizer model, each broken in one way."""
    root = tmp_path_factory.mktemp("broken")
    dirs = {name: root / name for name in ("truncated", "gpt2", "bad_shape_in_stage_1")}
    for directory in dirs.values():
        shutil.copytree(tokenizer_model_dir, directory)
    weights = dirs["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 100_000])
    config = json.loads((dirs["gpt2"] / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (dirs["gpt2"] / "config.json").write_text(json.dumps(config))
    # Only a rank holding layer 1 reads this tensor, so the error shows up after the replica started.
    path = dirs["bad_shape_in_stage_1"] / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dirs


@pytest.mark.parametrize(("args", "fragment"), [
    (["--model", "smollm2-135m", "--tp", "2"], "tp 2 does not divide smollm2-135m's 9 attention heads"),
    (["--model", "smollm2-135m", "--tp", "3", "1", "--layers", "20", "5"], "sum to smollm2-135m's 30 layers"),
    (["--model", "/nonexistent/hexgen-model"], "expected an embedded model"),
])
def test_layout_and_path_errors(args, fragment):
    assert_user_error([*args, "--prompt", "hi", "--max-new-tokens", "2"], fragment)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "hello " * 100], "it must be 1 to 63 tokens (the model's context is 64)"),
])
def test_sampling_and_prompt_errors(extra, fragment, tokenizer_model_dir):
    prompt = [] if "--prompt" in extra else ["--prompt", "hi"]
    assert_user_error(["--model", str(tokenizer_model_dir), *prompt, *extra, "--max-new-tokens", "2"], fragment)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--block-size", "12"], "--block-size must be a power of two in 1..256, got 12"),
    (["--block-size", "512"], "--block-size must be a power of two in 1..256, got 512"),
    (["--speculative-tokens", "17"], "--speculative-tokens must be in 0..16 (0 = off), got 17"),
    (["--memory-gb", "0"], "--memory-gb must be in (0, 1048576], got 0.0"),
    (["--memory-gb", "0.01"], "--memory-gb 0.01 cannot hold a rank's weights plus one KV block"),
])
def test_kv_cache_flag_errors(extra, fragment):
    # The embedded model's weights alone are ~0.5 GB: the budget is checked before its first-use conversion.
    assert_user_error(["--model", "smollm2-135m", "--prompt", "hi", *extra], fragment)


def test_unsupported_architecture(broken_models):
    assert_user_error(["--model", str(broken_models["gpt2"]), "--prompt", "hi"], "'GPT2LMHeadModel' is not supported")


@pytest.mark.parametrize("layout", [[], ["--tp", "1", "1"]])  # checked in this process / by the spawned ranks
def test_truncated_weight_file(layout, broken_models):
    assert_user_error(["--model", str(broken_models["truncated"]), "--prompt", "hi", *layout],
                      "not a readable safetensors file")


def test_rank_failing_after_start_stops_the_command(broken_models):
    line = assert_user_error(["--model", str(broken_models["bad_shape_in_stage_1"]), "--prompt", "hi",
                              "--tp", "1", "1", "--layers", "1", "1"], "model.layers.1.mlp.down_proj.weight")
    assert "rank 1" in line and "[32, 65]" in line  # found shape; config.json implies [32, 64]


def test_good_model_runs_and_leaves_nothing(tokenizer_model_dir):
    """The control case for the fixtures above: the unbroken model generates on two ranks."""
    code, out, err, left = run_cli(["--model", str(tokenizer_model_dir), "--prompt", "hi", "--max-new-tokens", "3",
                                    "--ignore-eos", "--tp", "1", "1"])
    assert code == 0, err
    assert out.strip() != "" and left == []
    assert "generated 3 (length)" in err


def test_a_request_longer_than_the_kv_pool_is_refused_not_cut_short(tokenizer_model_dir):
    """--memory-gb leaving about 8 blocks of 4 tokens: 50 new tokens cannot fit, and generate says so rather than
    stopping at the pool's end with finish reason 'length'."""
    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.kv_budget import GIB, RankShape, kv_bytes_per_block, rank_weight_bytes

    spec = resolve_model(str(tokenizer_model_dir)).spec
    rank = RankShape(spec.num_layers, 1, True, True)
    budget = rank_weight_bytes(spec, rank, 4, cpu_packed=True) + 8 * kv_bytes_per_block(spec, rank, 4, 4)
    line = assert_user_error(["--model", str(tokenizer_model_dir), "--prompt", "hi", "--max-new-tokens", "50",
                              "--ignore-eos", "--dtype", "float32", "--block-size", "4",
                              "--memory-gb", f"{budget / GIB:.12f}"], "but this replica's KV cache holds")
    assert "needs 51 tokens (1 in the prompt and up to 50 new)" in line and "--memory-gb" in line
