# Two set-up-free entry points: `make demo` (segment the bundled sample) and `make test` (the whole suite).
# Both create .venv when absent. Override TORCH for a GPU build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: venv
	$(PY) -m SASSRSegmentLib segment --demo -o demo-output --overwrite

bench: venv
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/training.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
