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

# pip byte-compiles every installed file one at a time (17k files, ~110 s of a fresh install);
# `--no-compile` skips that, and importing what the code loads, with bytecode writing on, compiles
# just those ~4.6k files (this machine may set PYTHONDONTWRITEBYTECODE, which would otherwise make
# every process compile them again). The two imports run side by side.
PIP := $(BIN)/pip install -q --no-compile
PRECOMPILE := PYTHONDONTWRITEBYTECODE= $(BIN)/python -c
RUNTIME_IMPORTS := import uae_jax.main, uae_jax.evaluate.cli, uae_jax.generate.cli, \
  uae_jax.convert.uae, uae_jax.tasks.uae, uae_jax.tasks.dit, uae_jax.tasks.qgvae, \
  uae_jax.tasks.kl_vae, uae_jax.evaluate.recon_eval, uae_jax.evaluate.inception
TEST_IMPORTS := import pytest, xdist, torch, transformers, sklearn, skimage; \
  from transformers import Dinov2WithRegistersModel, Dinov2Model, ViTMAEModel, CLIPVisionModel, \
  SiglipVisionModel

# `-e .` builds with build isolation: pip fetches setuptools>=68 (pyproject.toml); the setuptools
# of a fresh python3.11 venv cannot build the editable wheel without the `wheel` package.
$(RUNTIME): $(BIN)/python requirements.txt pyproject.toml
	$(PIP) -r requirements.txt -e .
	$(PRECOMPILE) "$(RUNTIME_IMPORTS)"
	touch $(RUNTIME)

# On a fresh machine `make test` installs both stacks in one pip call (requirements-test.txt
# includes requirements.txt).
$(TESTSTACK): $(BIN)/python requirements.txt requirements-test.txt pyproject.toml
	$(PIP) -r requirements-test.txt -e .
	$(PRECOMPILE) "$(RUNTIME_IMPORTS)" & pid=$$!; $(PRECOMPILE) "$(TEST_IMPORTS)" && wait $$pid
	touch $(RUNTIME) $(TESTSTACK)

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
