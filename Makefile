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
RUN_DIR ?= runs/digits
BUNDLE_DIR ?= bundles/digits

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

# The main job on the embedded default dataset (scikit-learn's digits, no download).
audit: setup
	$(VENV)/bin/mexit train --dataset digits --arch fcn18-1 --exits 4 --epochs 30 --out $(RUN_DIR)
	$(VENV)/bin/mexit export $(RUN_DIR) --out $(BUNDLE_DIR) --overwrite

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs bundles
