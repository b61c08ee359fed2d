# Every target works on a fresh machine: `setup` builds .venv itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test unit lint bench demo down clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that lies on these machines' disk; a bare `torch` pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest

unit: setup
	$(BIN)/python -m pytest -m unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check flowpp orchestrator tests bench
	$(BIN)/mypy flowpp orchestrator

bench: setup
	$(BIN)/python bench/train_step.py

# The main job end to end on the local stack: S3 (moto), MLflow server and Ray head on loopback,
# then a real `ray job submit` that prepares the demo shards into the bucket, trains, evaluates
# and registers the model. The stack stays up for browsing; `make down` stops it (its S3 objects,
# MLflow store and Ray token stay in runs/local). Run again, it resumes or, finished, does nothing.
DEMO_ARGS ?=
demo: setup
	infra/local/up
	set -a; . runs/local/env; set +a; \
	$(BIN)/ray job submit --address "$$RAY_DASHBOARD" --working-dir . -- \
	  python -m orchestrator train jobs/demo.yaml $(DEMO_ARGS)
	@# the new version becomes @champion if it beats the current one (exit 3: refused, and why);
	@# a re-run that trained nothing leaves the champion as it is
	set -a; . runs/local/env; set +a; \
	$(BIN)/flowpp promote --model flowpp-demo --s3-endpoint "$$FLOWPP_S3_ENDPOINT" || test $$? -eq 3
	@. runs/local/env; echo "MLflow: $$MLFLOW_TRACKING_URI   Ray: $$RAY_DASHBOARD   stop with: make down"

down:
	infra/local/down

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
