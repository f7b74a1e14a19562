#!/usr/bin/env bash
# Regenerates the Python modules for ambient/proto/*.proto (committed; tests/unit/proto checks they are
# current). Run after editing a .proto file.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" ambient/proto/*.proto
# Stubs only for the files that declare services.
"$PY" -m grpc_tools.protoc -I . --grpc_python_out="$out" $(grep -l '^service ' ambient/proto/*.proto)
