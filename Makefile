# mexit developer and user entry points. `make audit` and `make test` set everything up first.
#
# TORCH_SPEC is installed before the package so that pip does not resolve the package's torch range
# to a multi-GB CUDA build; override it for a GPU machine, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python
AUDIT_DIR ?= runs/audit

.PHONY: setup test lint audit bench clean

setup: $(VENV)/.mexit-setup

$(VENV)/.mexit-setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check mexit tests benchmarks

# The main job: the end-to-end audit on the embedded default dataset (scikit-learn's digits, no download).
audit: setup
	$(VENV)/bin/mexit audit --out $(AUDIT_DIR)

bench: setup
	PATH=$(VENV)/bin:$$PATH bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs bundles
