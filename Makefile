# Two commands on a fresh machine: `make demo` (set up, run the main job) and
# `make test` (set up, run the test suite). Both create .venv on first use.
# `make test-fast` runs everything but the slow and browser tests (about 2½ minutes on 2 cores).
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine serves this torch pair from its own disk; elsewhere pip downloads it.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# The suite runs on pytest-xdist workers, one per core (at most 4: each holds its own torch and
# fixtures); `make test WORKERS=0` runs it in this process.
WORKERS ?= auto
XDIST = -n $(WORKERS) --maxprocesses=4

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/vitlens demo

test: setup
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache vitlens-demo
