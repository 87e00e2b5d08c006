# The two commands of the README: `make demo` and `make test`.
# Each creates .venv (once per change of pyproject.toml) with nothing but Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Multi-device code paths run on 4 fake CPU devices in tests.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=4 TF_CPP_MIN_LOG_LEVEL=2

.PHONY: demo test env clean-env

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
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
	$(TEST_ENV) $(BIN)/python -m pytest -q

clean-env:
	rm -rf $(VENV)
