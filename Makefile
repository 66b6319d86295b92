# Two commands from a fresh clone: `make demo` and `make test`.
# Each creates .venv at the repo root when missing and installs kerasbn with its extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kerasbn-installed
# PyTorch's CPU build, which installs here from local disk (a plain `torch` would fetch GBs of CUDA).
TORCH_CPU := 2.13.0
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-tensorflow test-jax test-torch session-tensorflow session-jax session-torch reproduce test-processes test-floor bench lint venv fashion-mnist package-check

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[tensorflow,jax,torch,test,recipes,serve,hub]" "torch==$(TORCH_CPU)"
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

# One plain pytest session per Keras backend (Keras fixes its backend per process), side by side;
# each prints its report when it ends. Tests every backend shares are tests/shared (-m every_backend).
# The sessions themselves have no prerequisites: under --output-sync a prerequisite held the
# TensorFlow session (the longest) until another session ended (57 s late, measured).
test: $(STAMP) fashion-mnist
	@$(MAKE) --no-print-directory -j3 --output-sync=target session-tensorflow session-jax session-torch

test-tensorflow: $(STAMP) fashion-mnist
	@$(MAKE) --no-print-directory session-tensorflow
test-jax: $(STAMP)
	@$(MAKE) --no-print-directory session-jax
test-torch: $(STAMP)
	@$(MAKE) --no-print-directory session-torch

# The recipe's heaviest process scenarios (marker `processes`) are make test-processes' alone.
session-tensorflow:
	KERAS_BACKEND=tensorflow $(PY) -m pytest -m "not processes"
session-jax:
	KERAS_BACKEND=jax JAX_PLATFORMS=cpu $(PY) -m pytest tests/jax tests/shared -n 0
session-torch:
	KERAS_BACKEND=torch $(PY) -m pytest tests/torch tests/shared -n 0

# The process scenarios, every process a fresh interpreter started as a user starts it: stops and kills
# at any instant, a cluster that never forms and make reproduce stopped by a signal (which `make test`
# also runs, forked from a server that imported TensorFlow once), and the heaviest, which only this
# target runs (marker `processes`: one run on any split, lost and frozen machines, two workers stopped,
# the data service's losses; about 75 s of CPU that would put `make test` over 3 minutes). CI runs both.
PROCESS_TESTS := tests/recipes/test_inception_bn_train.py tests/recipes/test_lost_machine.py \
	tests/recipes/test_one_run.py tests/recipes/test_orchestrators.py tests/recipes/test_cluster_startup.py \
	tests/recipes/test_reproduce.py
test-processes: $(STAMP) fashion-mnist
	KERASBN_TEST_FRESH_INTERPRETERS=1 $(PY) -m pytest $(PROCESS_TESTS)

# The paper's Table 2 and Figure 2 on Fashion-MNIST, every network to its plateau, 3 seeds (4.4-4.8 hours
# of 2 cores measured, docs/recipes.md; rerunning continues). runs/reproduce/table2.md and figure2.png.
reproduce: $(STAMP) fashion-mnist
	$(PY) -m recipes.inception_bn.reproduce

# The library's tests on the oldest versions setup.cfg declares (tensorflow>=X, keras>=Y),
# in a second virtualenv; the recipes' tests need the newest only.
FLOOR_VENV := .venv-floor
FLOOR_TF := $(shell sed -n 's/^ *tensorflow>=\([0-9.]*\).*/\1/p' setup.cfg)
FLOOR_KERAS := $(shell sed -n 's/^ *keras>=\([0-9.]*\).*/\1/p' setup.cfg | head -1)
RECIPE_TESTS := --ignore=tests/recipes

$(FLOOR_VENV)/.installed-$(FLOOR_TF)-$(FLOOR_KERAS): setup.cfg
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q "tensorflow==$(FLOOR_TF)" "keras==$(FLOOR_KERAS)" "pytest>=7" "pytest-xdist>=3"
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

# JAX's floor in a virtualenv of its own (JAX and TensorFlow at their floors want different ml_dtypes):
# the JAX session on the `jax` extra's jax>=X with keras>=Y, and no TensorFlow installed at all.
FLOOR_JAX_VENV := .venv-floor-jax
FLOOR_JAX := $(shell sed -n 's/^ *jax>=\([0-9.]*\).*/\1/p' setup.cfg)
FLOOR_JAX_KERAS := $(shell sed -n 's/^ *keras>=\([0-9.]*\).*/\1/p' setup.cfg | tail -1)

$(FLOOR_JAX_VENV)/.installed-$(FLOOR_JAX)-$(FLOOR_JAX_KERAS): setup.cfg
	test -x $(FLOOR_JAX_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_JAX_VENV)
	$(FLOOR_JAX_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_JAX_VENV)/bin/python -m pip install -q "jax[cpu]==$(FLOOR_JAX)" "keras==$(FLOOR_JAX_KERAS)" "pytest>=7" "pytest-xdist>=3" scipy
	$(FLOOR_JAX_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-floor: $(FLOOR_VENV)/.installed-$(FLOOR_TF)-$(FLOOR_KERAS) $(FLOOR_JAX_VENV)/.installed-$(FLOOR_JAX)-$(FLOOR_JAX_KERAS)
	$(FLOOR_VENV)/bin/python -c "import tensorflow, keras; print('floor: tensorflow', tensorflow.__version__, 'keras', keras.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest $(RECIPE_TESTS)
	KERAS_BACKEND=jax $(FLOOR_JAX_VENV)/bin/python -c "import jax, keras; print('floor: jax', jax.__version__, 'keras', keras.__version__)"
	KERAS_BACKEND=jax $(FLOOR_JAX_VENV)/bin/python -m pytest tests/jax tests/shared -n 0

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check kerasbn recipes tests benchmarks

# The release artifacts as a user gets them: build the sdist and the wheel, check their metadata,
# install the wheel (not the checkout) into a fresh virtualenv with each backend and run one layer there.
# Each virtualenv goes once its check passed: three backends' installs at once would need ~4 GB of disk
# beside .venv and the floor's (CI ran out of space with them all kept).
PACKAGE_DIR := build/package-check
package-check: $(STAMP)
	$(PY) -m pip install -q build twine
	rm -rf $(PACKAGE_DIR) && mkdir -p $(PACKAGE_DIR)
	$(PY) -m build --sdist --wheel --outdir $(PACKAGE_DIR)/dist . >$(PACKAGE_DIR)/build.log 2>&1 || { tail -20 $(PACKAGE_DIR)/build.log; exit 1; }
	$(PY) -m twine check --strict $(PACKAGE_DIR)/dist/*
	$(PYTHON) -m venv $(PACKAGE_DIR)/venv
	$(PACKAGE_DIR)/venv/bin/python -m pip install -q "$$(ls $(PACKAGE_DIR)/dist/*.whl)[tensorflow]"
	cd $(PACKAGE_DIR) && venv/bin/python ../../tests/helpers/installed_wheel_check.py
	rm -rf $(PACKAGE_DIR)/venv
	# A JAX user's install: kerasbn[jax], no TensorFlow in the environment at all.
	$(PYTHON) -m venv $(PACKAGE_DIR)/venv-jax
	$(PACKAGE_DIR)/venv-jax/bin/python -m pip install -q "$$(ls $(PACKAGE_DIR)/dist/*.whl)[jax]"
	cd $(PACKAGE_DIR) && KERAS_BACKEND=jax venv-jax/bin/python ../../tests/helpers/installed_wheel_check.py
	rm -rf $(PACKAGE_DIR)/venv-jax
	# A PyTorch user's install: kerasbn[torch] (torch's CPU build, as `make venv` takes it), no TensorFlow.
	$(PYTHON) -m venv $(PACKAGE_DIR)/venv-torch
	$(PACKAGE_DIR)/venv-torch/bin/python -m pip install -q "$$(ls $(PACKAGE_DIR)/dist/*.whl)[torch]" "torch==$(TORCH_CPU)"
	cd $(PACKAGE_DIR) && KERAS_BACKEND=torch venv-torch/bin/python ../../tests/helpers/installed_wheel_check.py
	rm -rf $(PACKAGE_DIR)/venv-torch
