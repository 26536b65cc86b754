# Set-up is part of every target: the first run makes .venv (CPU torch pinned first, so that pip never swaps in a
# CUDA build), later runs reuse it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo convert-demo test

# The tiny world end to end: train base + sources, compose with the converter, evaluate, table + PNG, 4-bit answers.
demo: $(VENV)/.installed
	$(PYTHON) -m benchmarks.tinyworld

# Conversion from the published formats (LLaVA, Video-LLaVA, a composite) on tiny random sources.
convert-demo: $(VENV)/.installed
	$(PYTHON) demo.py

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "torch==2.13.0"
	$(VENV)/bin/pip install --quiet -e ".[dev,benchmarks]"
	touch $@
