# Two commands from a fresh clone: `make demo` and `make test`.
# Each creates .venv at the repo root when missing and installs kerasbn with its extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kerasbn-installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test bench lint venv fashion-mnist

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,recipes,serve]"
	touch $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist

# Fashion-MNIST installs offline from Debian's dataset-fashion-mnist package.
fashion-mnist:
	@test -d $(FASHION_MNIST) || ! command -v apt-get >/dev/null || \
	  { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	    $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	    echo "note: could not install dataset-fashion-mnist; the demo will try to download it"; }

demo: $(STAMP) fashion-mnist
	$(PY) -m recipes.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check kerasbn recipes tests benchmarks
