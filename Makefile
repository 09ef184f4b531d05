# Everything installs into .venv; torch is pinned and installed first (an unpinned torch pulls a multi-GB
# CUDA build). Override TORCH for another build, e.g. make test TORCH="torch==2.11.0".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PROMPT ?= red apple, openmoji style
OUT ?= amused.png
BIN := $(VENV)/bin

.PHONY: install generate test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

generate: install
	$(BIN)/amused generate "$(PROMPT)" --out "$(OUT)"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
