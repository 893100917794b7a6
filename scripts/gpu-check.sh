#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one short script for a lent GPU machine: the tiny
# Whisper's logits and greedy tokens on CUDA against the CPU (fp32 tolerance).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck source=scripts/env.sh
source scripts/env.sh
python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("cuda:", torch.cuda.get_device_name(0))'
cargo test --locked -p e2e-tests --test whisper_parity -- --nocapture
