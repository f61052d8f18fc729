# wbmri: `make serve` runs the service on the shipped model; `make test` runs the tests. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel by default: PyTorch's CPU index beside PyPI, whose plain torch==2.13.0 is a CUDA build of ~0.5 GB
# plus the NVIDIA libraries (pip takes the higher 2.13.0+cpu; one retry where that index is out of reach, as
# behind a package-registry-only proxy, where a local 2.13.0+cpu wheel is found instead). For CUDA:
# make install TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= --extra-index-url https://download.pytorch.org/whl/cpu --retries 1
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
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

serve: install
	$(VENV)/bin/wbmri serve --host $(HOST) --port $(PORT)

bench: install
	$(PY) tests/benchmarks/load_service.py
	$(PY) tests/benchmarks/bench_phantom.py
	$(PY) tests/benchmarks/bench_inference.py

synth-preview: install
	$(VENV)/bin/wbmri synth --n 3 --out data/preview --seed 1 --preview

# the virtual environment and test caches only: the service's studies (var/) and training runs (runs/) are the
# user's, removed by hand
clean:
	rm -rf $(VENV) .pytest_cache
