# Everything installs into .venv; torch is pinned and installed first (an unpinned torch pulls a multi-GB
# CUDA build). Override TORCH for another build, e.g. make test TORCH="torch==2.11.0".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PROMPT ?= red apple, google style
OUT ?= amused.png
BIN := $(VENV)/bin

.PHONY: install generate test clean

$(BIN)/.installed: pyproject.toml
	@# System packages the tests use: cairo (OpenMoji SVGs), Chromium + its driver (the demo's browser test) and
	@# the Noto Color Emoji font (the noto renderer's test; the paths amused.data.emoji looks in).
	@# Installed where we can (root on Debian); elsewhere, say what to install.
	@missing=""; ldconfig -p 2>/dev/null | grep -q libcairo.so.2 || missing="libcairo2"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	  find /usr/share/fonts -maxdepth 3 -name NotoColorEmoji.ttf 2>/dev/null | grep -q . \
	    || missing="$$missing fonts-noto-color-emoji"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    else echo "note: install $$missing (sudo apt-get install $$missing): the tests need them"; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,serve-ray]"
	touch $@

install: $(BIN)/.installed

generate: install
	$(BIN)/amused generate "$(PROMPT)" --out "$(OUT)"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
