# Two entry points for a fresh machine (see README):
#   make run    set up .venv, then `snakemake all` on the default study
#   make test   set up .venv, then lint and the test suite
PYTHON ?= python3
VENV ?= .venv
STUDY ?= default
CORES ?= 2
# the offline data copy beside this checkout; any FEDSELECT_DATA_ROOT in the environment wins
FEDSELECT_DATA_ROOT ?= $(abspath ../shared/data)
export FEDSELECT_DATA_ROOT
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py workflows/envs/fedselect.post-deploy.sh
	$(PYTHON) -m venv $(VENV)
	PYTHON=$(BIN)/python bash workflows/envs/fedselect.post-deploy.sh
	touch $@

run: setup
	$(BIN)/snakemake all --cores $(CORES) --config study=$(STUDY)

lint: setup
	$(BIN)/ruff check plugin tests analysis bench

test: lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf results .snakemake
