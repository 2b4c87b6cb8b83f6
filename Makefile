# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv and installs.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-mm test test-all lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/copd demo --out runs/demo

demo-mm: $(STAMP)
	$(VENV)/bin/copd demo --config configs/copd_mm_cpu.yaml --out runs/demo_mm --no-experts

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check copd_mega parallel data tests bench
	$(VENV)/bin/ruff format --check copd_mega parallel data tests bench

clean:
	rm -rf $(VENV) runs *.egg-info
