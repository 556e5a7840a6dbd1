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

# Every benchmarks/*.py in quick mode, one after another (they time CPU work: never in parallel),
# each writing its figures to bench-out/NAME.json (scripts without --json: their log only).
BENCH_OUT ?= bench-out
bench: $(STAMP)
	@mkdir -p $(BENCH_OUT); fail=0; \
	for f in benchmarks/*.py; do \
	  name=$$(basename $$f .py); args=""; \
	  grep -q -- '"--quick"' $$f && args="$$args --quick"; \
	  grep -q -- '"--json"' $$f && args="$$args --json $(BENCH_OUT)/$$name.json"; \
	  echo "== $$name$$args"; start=$$(date +%s); \
	  if $(BIN)/python $$f $$args > $(BENCH_OUT)/$$name.log 2>&1; then \
	    echo "   ok in $$(( $$(date +%s) - start )) s"; tail -n 4 $(BENCH_OUT)/$$name.log | sed 's/^/   /'; \
	  else echo "   FAILED (see $(BENCH_OUT)/$$name.log)"; tail -n 8 $(BENCH_OUT)/$$name.log | sed 's/^/   /'; fail=1; fi; \
	done; exit $$fail

clean:
	rm -rf $(VENV) demo-out .pytest_cache bench-out
