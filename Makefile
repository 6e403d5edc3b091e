PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: `make demo` installs the runtime stack only (no PyTorch); `make test` adds the test
# stack (PyTorch CPU, transformers, pytest) on top, also after an earlier `make demo`.
RUNTIME := $(VENV)/.installed-runtime
TESTSTACK := $(VENV)/.installed-test

.PHONY: demo demo-generate test test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(RUNTIME): $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install -q -r requirements.txt
	# With build isolation: pip fetches setuptools>=68 (pyproject.toml); the setuptools of a fresh
	# python3.11 venv cannot build the editable wheel without the `wheel` package.
	$(BIN)/pip install -q --no-deps -e .
	touch $(RUNTIME)

$(TESTSTACK): $(RUNTIME) requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $(TESTSTACK)

demo: $(RUNTIME)
	$(BIN)/python -m uae_jax.demo --workdir=runs/demo

demo-generate: $(RUNTIME)
	$(BIN)/python -m uae_jax.demo_generate --workdir=runs/demo_generate

# Two pytest workers (pytest-xdist): most of the suite's time is single-threaded XLA compilation,
# so a 2-core machine runs two tests at once. Tests sharing an expensive module fixture carry an
# `xdist_group` mark and stay on one worker (`--dist loadgroup`). `make test PYTEST_WORKERS=0`
# runs everything in one process.
PYTEST_WORKERS ?= 2

test: $(TESTSTACK)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=25

test-slow: $(TESTSTACK)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m slow

bench: $(RUNTIME)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) runs
