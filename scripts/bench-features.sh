#!/usr/bin/env bash
# Log-mel benchmark: ours vs HF's WhisperFeatureExtractor (default torch path and numpy path)
# on the 150-clip espeak test split and on identical full 30 s windows, pinned to one core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release --locked -p asr
exec taskset -c "${BENCH_CPU:-0}" "${CARGO_TARGET_DIR:-target}/release/asr" bench features "$@"
