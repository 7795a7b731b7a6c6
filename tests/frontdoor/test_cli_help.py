"""`hexgen --version`, defaults in every sub-command's --help, and errors that name the flag the user typed."""

from __future__ import annotations

import argparse
import re
import tomllib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from hexgen.cli import build_parser, main
from hexgen.engine.devices import cuda_device_count
from hexgen.machine import usable_cores

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def help_entry(help_text: str, flag: str) -> str:
    """The lines --help shows for one option, joined into one line."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.lstrip().startswith("-") and flag in re.split(r"[ ,]+", line.strip()))
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if line.lstrip().startswith("-"):
            break
        entry.append(line)
    return " ".join(part.strip() for part in entry)


def test_version_is_the_packaged_one(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"hexgen {tomllib.loads(PYPROJECT.read_text())['project']['version']}\n"


def test_a_source_checkout_without_package_metadata_still_runs(monkeypatch, capsys):
    """The GPU machine runs the checkout from PYTHONPATH, never installed: no metadata must not break the CLI."""
    import hexgen.cli

    def absent(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(hexgen.cli, "metadata", absent)
    monkeypatch.setattr(hexgen.cli, "version", absent)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == "hexgen (source checkout, not installed)\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "heterogeneous GPUs" in capsys.readouterr().out


@pytest.mark.parametrize(("command", "flag", "shown"), [
    (["generate"], "--max-new-tokens", "(default: 64)"),
    (["generate"], "--tp", "(default: one stage, TP 1)"),
    (["generate"], "--device", "(default: cpu)"),
    (["generate"], "--dtype", "(default: auto)"),
    (["serve"], "--port", "(default: 8000)"),
    (["serve"], "--dtype", "(default: auto)"),
    (["bench", "engine"], "--dtype", "(default: float32 bfloat16)"),
    (["bench", "engine"], "--repeats", "(default: 3)"),
    (["bench", "serve"], "--warmup", "(default: 1)"),
    (["plan"], "--generations", "(default: 150)"),
    (["simulate"], "--cv", "(default: 2.0)"),
])
def test_help_shows_defaults(command, flag, shown, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    entry = help_entry(capsys.readouterr().out, flag)
    assert entry.endswith(shown), entry
    assert entry.count("default") == 1, entry


def leaf_parsers(parser: argparse.ArgumentParser):
    """Every sub-command parser that takes options, e.g. `hexgen bench engine`."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield parser
    for group in groups:
        for child in group.choices.values():
            yield from leaf_parsers(child)


def test_every_option_with_a_value_shows_its_default():
    for parser in leaf_parsers(build_parser()):
        help_text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                flag = max(action.option_strings, key=len)
                assert "default" in help_entry(help_text, flag), f"{parser.prog} {flag}"


def test_help_hides_a_key_taken_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    with pytest.raises(SystemExit):
        main(["bench", "serve", "--help"])
    out = capsys.readouterr().out
    assert "sk-secret-123" not in out and "(default: $OPENAI_API_KEY)" in help_entry(out, "--api-key")


@pytest.mark.parametrize(("args", "line"), [
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"],
     "hexgen generate: error: --max-new-tokens must be >= 1, got 0"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "hexgen generate: error: --top-p must be in (0, 1], got 1.5"),
    (["generate", "--prompt", "hi", "--top-k", "-2"], "hexgen generate: error: --top-k must be >= 0 (0 = off), got -2"),
    (["bench", "engine", "--new-tokens", "1"], "hexgen bench engine: error: --new-tokens must be >= 2, got 1"),
    (["bench", "engine", "--prompt-tokens", "0"], "hexgen bench engine: error: --prompt-tokens must be >= 1, got 0"),
    (["bench", "engine", "--save-model", "/tmp/x"],
     "hexgen bench engine: error: --save-model keeps the random checkpoint of --shape; give --shape too"),
    # `hexgen profile`: a traceback from torch (threads, CUDA), an empty device type written into the profile, a
    # file name whose suffix chose neither format
    (["profile", "--threads", "-1", "-o", "p.yaml"],
     f"hexgen profile: error: --threads must be in 0..{usable_cores()} (this machine's cores; 0: torch's default), "
     "got -1"),
    pytest.param(["profile", "--device", "cuda", "-o", "p.yaml"], "hexgen profile: error: --device cuda: no CUDA "
                 "device is visible (torch.cuda.is_available() is False); use cpu",
                 marks=pytest.mark.skipif(cuda_device_count() > 0, reason="a CUDA device is visible")),
    (["profile", "--device-type", " ", "-o", "p.yaml"],
     "hexgen profile: error: --device-type is empty: give the GPU type name cluster files use, e.g. H200"),
    (["profile", "-o", "p.txt"], "hexgen profile: error: --output p.txt: a profile is written as .yaml (or .yml) or "
     ".json"),
    # each machine of a probed pair holds the transfer in memory: 100,000,000 MiB was taken
    (["cluster", "probe", "--ray", "127.0.0.1:1", "-o", "c.yaml", "--bulk-mib", "5000"],
     "hexgen cluster probe: error: --bulk-mib must be in 1..4096 (each machine holds it in memory), got 5000"),
    # Ray was started with it and waited 90 s for a node that could not come up
    (["node", "start", "--head", "--node-ip-address", "999.1.1.1"],
     "hexgen node start: error: --node-ip-address '999.1.1.1': expected this machine's IP address, e.g. 10.0.0.6"),
])
def test_errors_name_the_flag(args, line, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err == line + "\n"


def test_save_model_refuses_a_folder_with_files(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["bench", "engine", "--shape", "tiny", "--save-model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"hexgen bench engine: error: --save-model {tmp_path}: must be a new or "
                                       "empty folder (it would mix two checkpoints)\n")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_save_model_names_a_folder_it_cannot_create(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["bench", "engine", "--shape", "tiny", "--save-model", str(tmp_path / "file" / "model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hexgen bench engine: error: --save-model {tmp_path}/file/model: cannot create the folder (")
    assert err.count("\n") == 1


def engine_config(argv: list[str]):
    """The SchedulerConfig that `hexgen serve` / `generate` would build from these arguments for SmolLM2."""
    from hexgen.commands.engine_args import check_engine_args, scheduler_config
    from hexgen.models import load_model_spec

    args = build_parser().parse_args(argv)
    check_engine_args(args)
    return scheduler_config(args, load_model_spec("smollm2-135m"), 4, 256)


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_prefix_caching_is_on_unless_turned_off(command):
    base = [command, "--model", "smollm2-135m"] + (["--prompt", "hi"] if command == "generate" else [])
    on, off = engine_config(base), engine_config(base + ["--no-prefix-caching"])
    assert on.prefix_caching and not off.prefix_caching


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_step_overlap_is_left_to_the_device_unless_turned_off(command):
    base = [command, "--model", "smollm2-135m"] + (["--prompt", "hi"] if command == "generate" else [])
    assert engine_config(base).overlap_steps is None  # on for one GPU, off on CPU
    assert engine_config(base + ["--no-overlap-steps"]).overlap_steps is False


@pytest.mark.parametrize("command", ["serve", "generate"])
@pytest.mark.parametrize(("flags", "expected"), [
    (["--dtype", "bfloat16"], 32),  # CPU: a block of one of SmolLM2's heads (64 wide) holds 4 KiB at 32 tokens
    (["--dtype", "float32"], 16),
    (["--dtype", "bfloat16", "--block-size", "16"], 16),  # what the user names is kept
])
def test_the_block_size_default_follows_the_dtype_on_cpu(command, flags, expected):
    base = [command, "--model", "smollm2-135m"] + (["--prompt", "hi"] if command == "generate" else [])
    assert engine_config(base + flags).block_size == expected


@pytest.mark.parametrize(("args", "flag", "value"), [
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature", "nan"),
    (["generate", "--prompt", "hi", "--top-p", "inf"], "--top-p", "inf"),
    (["plan", "--cluster", "c.yaml", "--model", "m", "--rate", "nan", "--slo", "1"], "--rate", "nan"),
    (["plan", "--cluster", "c.yaml", "--model", "m", "--rate", "1", "--slo", "inf"], "--slo", "inf"),
    (["simulate", "--cluster", "c.yaml", "--plan", "p.json", "--rate", "1", "--slo", "1", "--cv", "nan"],
     "--cv", "nan"),
    (["serve", "--memory-gb", "1e999"], "--memory-gb", "1e999"),
    (["bench", "serve", "--rate", "NaN"], "--rate", "NaN"),
])
def test_float_flags_take_finite_numbers_only(args, flag, value, capsys):
    """argparse's float takes 'nan' and 'inf': every float flag refuses them before anything runs."""
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: argument {flag}: expected a finite number, got {value!r}")


OUTPUT_FLAGS = [
    (["plan", "--cluster", "c.yaml", "--model", "m", "--rate", "1", "--slo", "1"], "-o/--output"),
    (["profile"], "-o/--output"),
    (["cluster", "probe"], "-o/--output"),
    (["bench", "serve", "--model", "m"], "--json"),
    (["bench", "engine"], "--markdown"),
]


@pytest.mark.parametrize(("args", "flag"), OUTPUT_FLAGS)
def test_output_files_are_checked_before_the_work(args, flag, tmp_path, capsys):
    """A file written at the end of minutes of work (a plan, a profile, a report) into a folder that does not exist,
    or onto a folder, failed with a traceback once the work was done; now argparse refuses it at once."""
    option = flag.split("/")[-1]
    missing = tmp_path / "missing" / "out.txt"
    for target, message in [(missing, f"{missing}: the folder {missing.parent} does not exist"),
                            (tmp_path, f"{str(tmp_path)!r} is a folder, not a file name"),
                            ("", "expected a file name, got an empty one")]:
        with pytest.raises(SystemExit) as done:
            main([*args, option, str(target)])
        assert done.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {flag}: {message}")


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_sampling_params_refuse_a_temperature_that_is_not_a_finite_non_negative_number(temperature):
    from hexgen.engine.messages import SamplingParams

    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=temperature)
