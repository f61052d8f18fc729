# wbmri: `make serve` runs the service on the shipped model; `make test` runs the tests. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel by default; for CUDA: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve bench clean synth-preview

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# --no-cache-dir: a build fetched from an index is not kept twice (pip's cache and the venv) on a small disk
	$(PY) -m pip install -q --no-cache-dir "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider

serve: install
	$(VENV)/bin/wbmri serve --host $(HOST) --port $(PORT)

bench: install
	$(PY) tests/benchmarks/load_service.py
	$(PY) tests/benchmarks/bench_phantom.py
	$(PY) tests/benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) var runs .pytest_cache
