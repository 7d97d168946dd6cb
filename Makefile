# Two entry points for a fresh machine: `make demo` (main job on the built-in example) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# Prefer the CPU build of torch that lies on this kind of machine; elsewhere pip picks what fits.
	$(PIP) install -q "torch==2.13.0" || echo "torch==2.13.0 not available here; pip will choose a torch build"
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/diffst demo --out demo_output

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_speed.py
	$(PY) benchmarks/bench_sampler_quality.py
