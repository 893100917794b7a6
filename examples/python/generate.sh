#!/usr/bin/env bash
# Generates the Python stubs of proto/asr/v1/*.proto into gen/ (git-ignored) with grpcio-tools:
#   python -m grpc_tools.protoc -I../../proto --python_out=gen --pyi_out=gen \
#       --grpc_python_out=gen ../../proto/asr/v1/*.proto
# (the well-known google/protobuf imports come with grpc_tools). The scripts here do the same
# on start when gen/ is missing or older than the .proto files.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python3}" asr_client.py
