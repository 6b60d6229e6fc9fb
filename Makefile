# Two set-up-free entry points: `make demo` (segment the bundled sample) and `make test` (the whole suite).
# Both create .venv when absent. Override TORCH for a GPU build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# Slicer 5.6 / 5.8 ship Python 3.9: the torch-free tests also run under a real 3.9 where there is one.
PYTHON39 ?= $(shell for p in $(HOME)/.pyenv/versions/3.9*/bin/python3.9 $$(command -v python3.9); do \
	"$$p" -c "" 2>/dev/null && echo "$$p" && break; done)
VENV39 := .venv39
TORCH_FREE_TESTS := Testing/test_geometry.py Testing/test_normalization.py Testing/test_imageio.py \
	Testing/test_lesions.py Testing/test_metrics.py Testing/test_lowres.py Testing/test_data.py \
	Testing/test_cli_parsing.py Testing/test_hostmemory.py

.PHONY: venv test test39 lint demo bench clean

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
	$(VENV)/bin/vermin -q -t=3.9- --no-tips --violations SASSRSegment

$(VENV39)/.installed: pyproject.toml
	$(PYTHON39) -m venv $(VENV39)
	$(VENV39)/bin/python -m pip install -q --upgrade pip
	$(VENV39)/bin/python -m pip install -q "numpy>=1.24" "SimpleITK>=2.3" "pytest>=7"
	touch $@

test39: $(if $(PYTHON39),$(VENV39)/.installed)
ifeq ($(PYTHON39),)
	@echo "Python 3.9 tests skipped: no python3.9 on PATH or under ~/.pyenv/versions"
else
	PYTHONPATH=SASSRSegment $(VENV39)/bin/python -m pytest -q -p no:cacheprovider $(TORCH_FREE_TESTS)
endif

test: lint test39
	$(PY) -m pytest -q

demo: venv
	$(PY) -m SASSRSegmentLib segment --demo -o demo-output --overwrite

bench: venv
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/training.py

clean:
	rm -rf $(VENV) $(VENV39) demo-output .pytest_cache .ruff_cache
