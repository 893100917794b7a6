#!/usr/bin/env bash
# The main job (README): installs what is needed, builds the release binaries, starts the model
# service (int8 whisper-base) and a feature service on loopback, and then, all through the
# services: checks the feature service's log-mel frames of a Mandarin clip (AISHELL-1) against a
# local extraction, transcribes the clip (language zh), ingests 32 espeak-ng clips as a dataset,
# runs a short LoRA job (the recipe, one epoch), and transcribes the clip again with the new
# adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release --locked -p feature-service -p model-service -p asr
bin="${CARGO_TARGET_DIR:-target}/release"
work="${CARGO_TARGET_DIR:-target}/demo"
mkdir -p "$work"
model_addr="127.0.0.1:${DEMO_MODEL_PORT:-50052}"
feature_addr="127.0.0.1:${DEMO_FEATURE_PORT:-50051}"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

if [ ! -f assets/whisper-base/model.safetensors ]; then
    "$bin/asr" convert --from ct2 assets/whisper-base-ct2 assets/whisper-base --force
fi
rm -rf "$work/data"
"$bin/model-service" --listen "$model_addr" --model assets/whisper-base --data-root "$work/data" \
    >"$work/model-service.log" 2>&1 &
pids+=($!)
"$bin/feature-service" --listen "$feature_addr" --model-service "http://$model_addr" >"$work/feature-service.log" 2>&1 &
pids+=($!)
# The model loads in the background; status succeeds once both services answer.
for _ in $(seq 1 300); do
    "$bin/asr" status --server "http://$feature_addr" >/dev/null 2>&1 && break
    sleep 0.2
done
echo "== services"
"$bin/asr" status --server "http://$feature_addr"
export ASR_SERVER="http://$feature_addr" ASR_MODEL_SERVICE="http://$model_addr"

clip="assets/aishell/BAC009S0764W0121.wav"
echo "== log-mel features of $clip (reference text: 甚至出现交易几乎停滞的情况)"
"$bin/asr" features "$clip" --remote "http://$feature_addr" --out "$work/remote.npy"
"$bin/asr" features "$clip" --out "$work/local.npy"
cmp "$work/remote.npy" "$work/local.npy" && echo "feature service and local extraction agree byte for byte"

echo "== transcription through the services (whisper-base, int8, language zh)"
"$bin/asr" transcribe --language zh "$clip"
echo "   the same in-process:"
"$bin/asr" transcribe --local --model assets/whisper-base --language zh "$clip"

echo "== a dataset: 32 espeak-ng training clips and 8 for evaluation"
"$bin/asr" ingest --name espeak assets/corpus/espeak/train.jsonl --max-examples 32 --split train
"$bin/asr" ingest --name espeak assets/corpus/espeak/dev.jsonl --max-examples 8 --split eval

echo "== a short LoRA job (the recipe: r=4, alpha 64, q_proj/v_proj, lr 1e-3; 1 epoch, batch 4)"
"$bin/asr" train --train espeak --eval espeak --eval-split eval --output-adapter espeak-demo \
    --epochs 1 --grad-accum 1 --logging-steps 2 --eval-cer --watch

echo "== transcription with the new adapter"
"$bin/asr" adapters load espeak-demo
# (no --model-service: asr asks the feature service at ASR_SERVER where the model service is)
env -u ASR_MODEL_SERVICE "$bin/asr" adapters list
"$bin/asr" transcribe --language zh --adapter-name espeak-demo "$clip"
