# Entry points for a fresh machine (see README):
#   make run    set up .venv, then `snakemake all` on the default study
#   make test   set up .venv, then lint and the test suite
#   make bench  the benchmarks' CPU smoke (bench/gpu_check --tiny); on a GPU see bench/README.md
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

# two workers, one test file each at a time (module fixtures stay in one process)
TEST_WORKERS ?= 2
test: lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

# the CPU smoke of the benchmarks' GPU path (bench/README.md, "gpu_check"): a tiny CIFAR-10 subset in
# .gpu/ (made once), ours vs the released code (when .gpu/released exists) and the study cost at J = 1,2
bench: setup
	@[ -d .gpu/data ] || bash bench/gpu_check --prepare --no-wheels
	PYTHON=$(BIN)/python bash bench/gpu_check --device cpu --tiny --out results/bench

clean:
	rm -rf results .snakemake
