#!/usr/bin/env bash
# The test command (README): installs what the tests need (idempotent, cached under
# ~/.cache/asr-lora) and runs every test of the workspace: unit tests, the differential
# tests against HF transformers / soxr from the venv, and the services over loopback gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo test --workspace --locked "$@"
