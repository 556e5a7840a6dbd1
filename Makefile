# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv and installs itrkit into it first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install lint bench clean

# The library asks only torch>=2.1; what we test and demo on is pinned here, in the constraints
# file (this machine's CPU wheel). On a machine with its own CUDA torch: `make install CONSTRAINTS=`.
CONSTRAINTS ?= constraints/cpu.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/itrkit demo --out demo-out

test: $(STAMP)
	bash scripts/install_chromium.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
