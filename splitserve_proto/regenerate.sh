#!/usr/bin/env bash
# Regenerate the Python modules of splitserve_proto/*.proto (needs grpcio-tools, a dev extra).
# The package is not called `proto`: ray[default] installs proto-plus, whose top-level
# `proto` module would shadow ours.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
for f in splitserve_proto/generation.proto splitserve_proto/kv_transfer.proto; do
  "$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. "$f"
done
