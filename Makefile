PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(VENV)/bin/python requirements.txt requirements-test.txt pyproject.toml
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m uae_jax.demo --workdir=runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) runs
