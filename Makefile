# Two commands from a fresh clone: `make demo` and `make test`.
# Each creates .venv at the repo root when missing and installs kerasbn with its extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kerasbn-installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test bench lint venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,recipes,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m recipes.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check kerasbn recipes tests benchmarks
