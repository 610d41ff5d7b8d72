# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   - a tune on the embedded corpus: recommendation, regime, evidence, cost, plots
#   make test   - the test suite
# torch is installed first, pinned, so that the package's `torch>=` requirement never pulls a
# newer build. Where pip's index serves the CUDA build (plain PyPI on Linux does), pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU one.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# tiny on byte tokens, batch 32, 800 steps, WSD: the setting of bench/bench_tune.py (optimum interior in lr;
# in wd a plateau at small wd, README "Against 2-D search"); the ELR scan at lr 2^-8 over 2^-11..2^-7,
# a zoom, lr x 0.5 and x 2 at its ELR
demo: setup
	$(VENV)/bin/trajinv tune --schedule wsd --lr 0.00390625 --center-elr 0.001953125 --octaves 4 --points 5 \
		--zoom-points 2 --check-factor 0.5 --check-factor 2 --eval-every 200 --log-every 50 --out runs/demo

test: setup
	$(PY) -m pytest -n 2 tests

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info runs .cache
