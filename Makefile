# `make run` and `make test` bootstrap .venv themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: run test test-slow test-containers format bench bench-matching clean data pipeline pipeline-local

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q -e '.[pipeline,dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import tlpipe, torch, dvc, mlflow"
	touch $(STAMP)

data:
	@test -d $(FMNIST) || (echo "Fashion-MNIST not in $(FMNIST): installing the Debian package (or tlpipe fetch downloads it)"; \
	  (command -v apt-get >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || true)

## run: the whole pipeline on the default scenario (dvc repro), then the comparison table
run: $(STAMP) data
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/tlpipe run

## test: lint + the default test suite (< 10 min on 2 cores)
# One torch/OpenMP thread per process: the tests start many small training processes (DVC
# stages, DataLoader workers) on a few cores, where a second thread each makes a tiny CNN step
# far slower (benchmarks/README.md). Results agree up to float rounding.
TEST_ENV := OMP_NUM_THREADS=1

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	PATH=$(CURDIR)/$(BIN):$$PATH $(TEST_ENV) $(BIN)/pytest -q

## test-slow: the long tests (fresh-venv installs, full-size end-to-end, the DAG twice)
test-slow: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(TEST_ENV) $(BIN)/pytest -q -m slow

## test-containers: build the images, run the DAG in containers against MLflow+Postgres+S3
test-containers: $(STAMP)
	BIN=$(BIN) bash containers/test.sh

## pipeline: compile the Kubeflow pipeline (commit src/tlpipe/kfp/transfer_learning.yaml, shipped in the wheel)
pipeline: $(STAMP)
	$(BIN)/python -m pipelines.transfer_learning

## pipeline-local: the compiled Kubeflow DAG on this machine (kfp.local)
pipeline-local: $(STAMP) data
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/tlpipe pipeline run-local

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/transfer_table.py

bench-matching: $(STAMP)
	$(BIN)/python benchmarks/matching.py --precision-only

clean:
	rm -rf data models matching eval export checkpoints mlflow.db mlruns
