# Every target works on a fresh machine: `setup` builds .venv itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Exact versions for CI, `make setup` and the training image (infra/docker/Dockerfile); `make lock` writes it,
# resolved for the image's Python. Another Python installs from pyproject's ranges instead.
LOCK := requirements/constraints.txt
LOCK_PYTHON := 3.11

.PHONY: setup test test-fast coverage unit lint bench demo demo-long down clean lock

# [test] holds everything: the core, [server] (the MLflow server of the local stack), [demo]
# (scikit-image for `flowpp prepare demo`), moto and boto3 (the local S3), pytest, ruff and mypy.
$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# First the CPU build of torch that lies on these machines' disk; a bare `torch` pulls CUDA.
	if [ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = $(LOCK_PYTHON) ]; then \
	  lock='-c $(LOCK)'; else lock=; echo "not Python $(LOCK_PYTHON): installing without $(LOCK)"; fi; \
	$(BIN)/pip install -q $$lock torch==2.13.0 && $(BIN)/pip install -q $$lock -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# Two phases, both always run: the unit tier on both cores (pytest-xdist, one torch thread a process:
# two thread pools of two on 2 cores spin against each other), then every other tier (Ray, the
# services, the local stack) in two lanes at once, a test at a time in each (tests/lanes.py says
# which lane takes what). The slowest tests are printed every run, so that drift shows. PYTEST_ARGS
# adds options to both phases; a phase it leaves empty (pytest's exit 5) is not a failure.
PYTEST_ARGS ?=
PYTEST := $(BIN)/python -m pytest
UNIT_PHASE := OMP_NUM_THREADS=1 $(PYTEST) -n 2
ok_or_empty = || { s=$$?; [ $$s -eq 5 ] || rc=$$s; }
test: setup
	rc=0; \
	$(UNIT_PHASE) -m unit --durations=10 $(PYTEST_ARGS) $(ok_or_empty); \
	$(BIN)/python -m tests.lanes $(PYTEST_ARGS) $(ok_or_empty); \
	exit $$rc

# The inner loop (at most 3 minutes on 2 cores): unit, infra and integration tests, less those marked
# slow (3 s or more) and the e2e tier. CI runs everything (`make test`).
test-fast: setup
	rc=0; \
	$(UNIT_PHASE) -m "unit and not slow" --durations=5 $(PYTEST_ARGS) $(ok_or_empty); \
	$(PYTEST) -m "not unit and not slow and not e2e" --durations=5 $(PYTEST_ARGS) $(ok_or_empty); \
	exit $$rc

# Line coverage of flowpp/ and orchestrator/ over the same tests as `make test`, in the same two
# phases and lanes, combined (the pytest processes; Ray workers and subprocesses are not traced).
COV := --cov=flowpp --cov=orchestrator --cov-report=
coverage: setup
	rc=0; rm -f .coverage .coverage.lanes.*; \
	$(UNIT_PHASE) -m unit $(COV) $(PYTEST_ARGS) $(ok_or_empty); \
	COVERAGE_FILE=.coverage.lanes $(BIN)/python -m tests.lanes $(COV) $(PYTEST_ARGS) $(ok_or_empty); \
	$(BIN)/python -m coverage combine --append .coverage.lanes.* && $(BIN)/python -m coverage report; \
	exit $$rc

unit: setup
	$(UNIT_PHASE) -m unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check flowpp orchestrator tests bench
	$(BIN)/mypy flowpp orchestrator

bench: setup
	$(BIN)/python bench/train_step.py

# The main job end to end on the local stack (needs [server] and [demo], and moto and boto3 from
# [test]: `setup` installs them all): S3 (moto), MLflow server and Ray head on loopback,
# then a real `ray job submit` that prepares the demo shards into the bucket, trains, evaluates
# and registers the model. The stack stays up for browsing; `make down` stops it (its S3 objects,
# MLflow store and Ray token stay in runs/local). Run again, it resumes or, finished, does nothing.
DEMO_ARGS ?=
DEMO_JOB ?= jobs/demo.yaml
DEMO_MODEL ?= flowpp-demo
demo: setup
	infra/local/up
	set -a; . runs/local/env; set +a; \
	$(BIN)/ray job submit --address "$$RAY_DASHBOARD" --working-dir . -- \
	  python -m orchestrator train $(DEMO_JOB) $(DEMO_ARGS)
	@# the new version becomes @champion if it beats the current one (exit 3: refused, and why);
	@# a re-run that trained nothing leaves the champion as it is
	set -a; . runs/local/env; set +a; \
	$(BIN)/flowpp promote --model $(DEMO_MODEL) --s3-endpoint "$$FLOWPP_S3_ENDPOINT" || test $$? -eq 3
	@. runs/local/env; echo "MLflow: $$MLFLOW_TRACKING_URI   Ray: $$RAY_DASHBOARD   stop with: make down"

# The same on the one-hour recipe (jobs/demo-long.yaml): a model that beats PNG on its validation photographs.
demo-long:
	$(MAKE) demo DEMO_JOB=jobs/demo-long.yaml DEMO_MODEL=flowpp-demo-long

down:
	infra/local/down

# Re-pins $(LOCK) after a change to pyproject's ranges or requirements/constraints.in, keeping every
# pin that still fits (LOCK_ARGS=--upgrade moves them all to the newest allowed). It resolves with
# this venv's Python (LOCK_PYTHON, as in the training image) and pip, which takes the CPU torch on this
# machine's disk: no CUDA wheel is pinned, so the base image keeps its own CUDA libraries.
LOCK_ARGS ?=
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c 'import sys; assert "%d.%d" % sys.version_info[:2] == "$(LOCK_PYTHON)", sys.version'
	$(BIN)/pip install -q 'pip-tools==7.6.2'
	CUSTOM_COMPILE_COMMAND='make lock' $(BIN)/pip-compile --quiet --all-extras --strip-extras \
	  --no-emit-index-url --no-emit-find-links --unsafe-package flowpp-orchestrator $(LOCK_ARGS) \
	  --output-file $(LOCK) pyproject.toml requirements/constraints.in
	@# torch's version alone, so both the image's CUDA build and CI's CPU build satisfy it
	sed -i -E 's/^(torch==[0-9.]+)\+[A-Za-z0-9.]+/\1/' $(LOCK)
	@if grep -P '^(nvidia-(?!ml-py)|triton==)' $(LOCK); then \
	  echo "$(LOCK): CUDA wheels pinned (the resolver took a CUDA torch); install the CPU torch and re-run"; exit 1; fi

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
