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
	@# cairosvg (OpenMoji rasterising, tested) needs the cairo library: install it where we can (root, Debian)
	@if ! ldconfig -p 2>/dev/null | grep -q libcairo.so.2; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -qq && apt-get install -y -qq libcairo2 >/dev/null; \
	  else echo "note: libcairo2 is missing (sudo apt-get install libcairo2); OpenMoji rendering and its tests need it"; fi; fi
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
