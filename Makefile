# The two commands of README.md, each complete on a machine with only Python:
#   make demo   the offline demo (retclip demo) on its embedded default, into $(DEMO_OUT)
#   make test   lint, types, import contracts and the test suite (what .ci/run runs)
# Both create the project's virtual environment $(VENV) if it is missing and install into it what
# they need; re-running installs nothing new unless pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
DEMO_OUT ?= retclip-demo
# PyTorch pins of the CI machine kind (x86_64, Python 3.11: a local wheel); set TORCH= to keep
# whatever torch the package's own range admits.
TORCH ?= torch==2.14.1 torchvision==0.29.1

BIN := $(VENV)/bin
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1

.PHONY: demo test lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# one stamp per set of extras, rebuilt when pyproject.toml changes
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[demo]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[all,dev]"
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	OMP_NUM_THREADS=1 $(BIN)/retclip demo --out $(DEMO_OUT)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(TEST_ENV) $(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
