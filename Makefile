# The two commands of the README: `make demo` and `make test`.
# Each creates .venv (once per change of pyproject.toml) with nothing but Python.

# The supported Python versions are written once, as requires-python in pyproject.toml
# (">=3.A,<3.B"); PYTHON is the first of python3.A ... python3.(B-1) on PATH, oldest
# first (3.11 is the one the pins were verified on), else python3 if its version is
# among them. `make PYTHON=/path/to/python` chooses another.
PYTHON_MINORS := $(shell sed -n 's/^requires-python *= *">= *3\.\([0-9][0-9]*\) *, *< *3\.\([0-9][0-9]*\) *".*/\1 \2/p' pyproject.toml)
SUPPORTED := $(shell set -- $(PYTHON_MINORS); [ $$# -eq 2 ] || exit 0; \
  m=$$1; while [ $$m -lt $$2 ]; do printf '3.%s ' $$m; m=$$((m + 1)); done)
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell set -- $(PYTHON_MINORS); [ $$# -eq 2 ] || exit 0; \
  m=$$1; while [ $$m -lt $$2 ]; do \
    command -v python3.$$m >/dev/null 2>&1 && { echo python3.$$m; exit 0; }; m=$$((m + 1)); done; \
  m=$$(python3 -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else -1)' \
    2>/dev/null) && [ "$$m" -ge $$1 ] 2>/dev/null && [ "$$m" -lt $$2 ] && echo python3)
endif
# Expanded only where a recipe needs an interpreter and none was found: one line, then stop.
comma := ,
NO_PYTHON = $(error $(strip $(if $(SUPPORTED),no supported Python on PATH: expected \
  $(subst $() , or ,$(strip $(addprefix python,$(SUPPORTED)))) (or python3 of one of those \
  versions; requires-python in pyproject.toml); install one or pass make PYTHON=/path/to/python,\
  cannot read the supported versions from requires-python in pyproject.toml (expected \
  ">=3.A$(comma)<3.B"); pass make PYTHON=/path/to/python)))
VENV := .venv
BIN := $(VENV)/bin
# Multi-device code paths run on 4 fake CPU devices in tests.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=4 TF_CPP_MIN_LOG_LEVEL=2
# pytest-xdist worker processes. Much of the suite waits on one thread (subprocesses,
# Python-side set-up), so two workers keep two cores busy; more cores: make test TEST_WORKERS=8.
# loadfile: the tests of one file run in one worker and share its module fixtures.
TEST_WORKERS ?= 2

.PHONY: demo test env clean-env

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(or $(PYTHON),$(NO_PYTHON)) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

# Tests also need pytest, ruff, torch and onnx (porting and export tests run, never skip).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,torch,onnx]'
	touch $@

# Generates and prepares synthetic_details, trains configs/synthetic.py on the CPU,
# evaluates, prints the results table and writes runs/synthetic/results.json.
demo: env
	$(BIN)/python train.py --config configs/synthetic.py --workdir runs/synthetic

# The style check comes first: a tree that ruff rejects does not land.
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean-env:
	rm -rf $(VENV)
