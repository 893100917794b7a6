#!/usr/bin/env bash
# The checks that need a CUDA GPU: the tiny Whisper on CUDA against the CPU in fp32 (with and
# without cuDNN), fp16, bf16 and int8 linears (tests/whisper_parity.rs,
# tiny_whisper_cuda_matches_cpu; it prints one line of figures per comparison). Two ways:
#
# 1. A GPU machine with our setup (Rust, and internet for scripts/setup.sh): this script, which
#    runs the whole whisper_parity test file with cargo.
#
# 2. A bare GPU machine (no Rust, no internet, a python3 with torch and transformers, as the lent
#    machines are): build here a test binary against that machine's torch version, then run it
#    there from the repository root with .gpu/ (ignored by git) copied along:
#      here:   scripts/gpu-build.sh          (TORCH_VERSION=2.11.0 by default)
#      there:  bash .gpu/run.sh
#
# Either way the binary must list libtorch_cuda.so as needed; shared/build-support links it with
# --no-as-needed whenever the libtorch has it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck source=scripts/env.sh
source scripts/env.sh
python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("cuda:", torch.cuda.get_device_name(0))'
export ASR_REQUIRE_CUDA=1
cargo test --locked -p e2e-tests --test whisper_parity -- --nocapture
