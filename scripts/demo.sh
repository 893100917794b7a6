#!/usr/bin/env bash
# The main job (README): installs what is needed, builds the release binaries, starts the model
# service and a feature service on loopback, and sends a Mandarin clip (AISHELL-1) through the
# feature service, transcribes it in-process with the int8 whisper-base, runs a short LoRA
# fine-tuning (the recipe on 32 espeak-ng clips, one epoch) and transcribes the clip again with
# the adapter. Transcription and training through the services' RPCs join with issue 5; until
# then the script says so instead of faking them.
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

"$bin/model-service" --listen "$model_addr" --data-root "$work/data" >"$work/model-service.log" 2>&1 &
pids+=($!)
"$bin/feature-service" --listen "$feature_addr" --model-service "http://$model_addr" >"$work/feature-service.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    "$bin/asr" status --server "http://$feature_addr" >/dev/null 2>&1 && break
    sleep 0.2
done
echo "== services"
"$bin/asr" status --server "http://$feature_addr"

clip="assets/aishell/BAC009S0764W0121.wav"
echo "== log-mel features of $clip (reference text: 甚至出现交易几乎停滞的情况)"
"$bin/asr" features "$clip" --remote "http://$feature_addr" --out "$work/remote.npy"
"$bin/asr" features "$clip" --out "$work/local.npy"
cmp "$work/remote.npy" "$work/local.npy" && echo "feature service and local extraction agree byte for byte"

echo "== transcription (whisper-base, int8, language zh, in-process)"
if [ ! -f assets/whisper-base/model.safetensors ]; then
    "$bin/asr" convert --from ct2 assets/whisper-base-ct2 assets/whisper-base --force
fi
"$bin/asr" transcribe --local --model assets/whisper-base --language zh "$clip"

echo "== a short LoRA run (the recipe: r=4, alpha 64, q_proj/v_proj, lr 1e-3; 32 clips, 1 epoch)"
rm -rf "$work/lora"
"$bin/asr" train --local --model assets/whisper-base \
    --train assets/corpus/espeak/train.jsonl --max-train-examples 32 \
    --eval assets/corpus/espeak/dev.jsonl --max-eval-examples 8 --eval-cer \
    --epochs 1 --grad-accum 1 --logging-steps 2 --output "$work/lora"

echo "== transcription with the adapter"
"$bin/asr" transcribe --local --model assets/whisper-base --language zh --adapter "$work/lora/adapter" "$clip"

echo "== transcription and training through the services"
echo "not available yet: the Transcribe/Train RPCs come with issue 5; the model service answers"
echo "them UNIMPLEMENTED."
