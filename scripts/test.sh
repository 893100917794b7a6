#!/usr/bin/env bash
# The test command (README): installs what the tests need (idempotent, cached under
# ~/.cache/asr-lora) and runs every test of the workspace: unit tests, the differential
# tests against HF transformers / soxr from the venv, and the services over loopback gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Known advisories in the dependency tree (vendored RustSec database; see scripts/audit.sh).
bash scripts/audit.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
# Build the tests first: `cargo run -p asr` would resolve features for asr alone and build
# tokio, tonic and the rest a second time (5.4 minutes on a fresh machine).
cargo test --workspace --locked --no-run
# whisper-base as an HF directory, converted once from the setup's CTranslate2 copy (assets/
# lives in ~/.cache, so later runs find it), by the asr binary the tests use.
if [ ! -f assets/whisper-base/model.safetensors ]; then
    "${CARGO_TARGET_DIR:-target}/debug/asr" convert --from ct2 assets/whisper-base-ct2 \
        assets/whisper-base --force
fi
cargo test --workspace --locked "$@"
