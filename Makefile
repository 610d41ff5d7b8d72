# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   - the default sweep on the embedded corpus, plots and summary
#   make test   - the test suite
# torch is installed first from the pinned CPU-capable release so that the
# package's `torch>=` requirement never pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/trajinv sweep --out runs/demo

test: setup
	$(PY) -m pytest -n 2 tests

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info runs .cache
