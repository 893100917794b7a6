#!/usr/bin/env bash
# Fuzzes the audio library and the services' request conversions with cargo-fuzz
# (libFuzzer), each target for a fixed time, and prints executions and crashes per target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      # default: 60 s, every target
#
# - cargo-fuzz is installed once into ~/.cache/asr-lora (pinned); the targets build on the
#   nightly toolchain from fuzz/ (its own workspace).
# - Seeds: fuzz/seeds/TARGET (committed) plus audio made from the repo's clips (every
#   container, cut at several lengths) and protobuf encodings of valid requests, written to
#   fuzz/corpus/_seeds/. libFuzzer grows fuzz/corpus/TARGET (not in git) across runs.
# - Fork mode keeps fuzzing after a crash; every crash, timeout or OOM input is copied to
#   fuzz/regressions/TARGET/, which `cargo test -p fuzz-targets` replays.
# - FUZZ_SANITIZER (default: address) picks the sanitizer; see README for model_requests.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

ALL_TARGETS=(audio_container audio_pcm audio_resample audio_mel audio_pipeline feature_requests model_requests)
SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
SANITIZER="${FUZZ_SANITIZER:-address}"

CARGO_FUZZ_VERSION=0.13.2
CARGO_FUZZ_ROOT="$ASR_CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
if [ ! -x "$CARGO_FUZZ_ROOT/bin/cargo-fuzz" ]; then
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$CARGO_FUZZ_ROOT"
fi
export PATH="$CARGO_FUZZ_ROOT/bin:$PATH"
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi

# Seeds: request encodings and audio in every container, from the repo's clips.
seeds=fuzz/corpus/_seeds
rm -rf "$seeds"
mkdir -p "$seeds"
cargo run -q -p fuzz-targets --bin fuzz-seeds -- "$seeds"
mapfile -t clips < <(
    ls assets/aishell/*.wav
    find -L assets/corpus/espeak/test -name '*.wav' | sort | head -n 2
)
.venv/bin/python scripts/fuzz_seeds.py "$seeds" "${clips[@]}"

fuzz=(cargo +nightly fuzz)
"${fuzz[@]}" build --sanitizer "$SANITIZER"

mkdir -p fuzz/logs
rows=()
total_crashes=0
for target in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target" "fuzz/regressions/$target"
    before=$(mktemp)
    ls "fuzz/artifacts/$target" | sort >"$before"
    corpora=("fuzz/corpus/$target")
    for dir in "fuzz/seeds/$target" "$seeds/$target"; do
        [ -d "$dir" ] && corpora+=("$dir")
    done
    log="fuzz/logs/$target.log"
    echo "fuzz: $target for ${SECONDS_PER_TARGET}s (log: $log)" >&2
    # -timeout: one input may take 10 s (a debug-assertion build decoding a long file);
    # -rss_limit_mb: an input needing over 2 GB is an unbounded allocation.
    "${fuzz[@]}" run --sanitizer "$SANITIZER" "$target" "${corpora[@]}" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        -print_final_stats=1 >"$log" 2>&1 || true
    crashes=0
    while read -r name; do
        case "$name" in
            crash-* | timeout-* | oom-* | leak-*)
                cp "fuzz/artifacts/$target/$name" "fuzz/regressions/$target/$name"
                crashes=$((crashes + 1))
                ;;
        esac
    done < <(ls "fuzz/artifacts/$target" | sort | comm -13 "$before" -)
    rm -f "$before"
    execs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    rows+=("$(printf '%-18s %14s %10s %8s' "$target" "${execs:-?}" "$corpus" "$crashes")")
    total_crashes=$((total_crashes + crashes))
done

printf '\nfuzz: %s s per target, sanitizer %s\n' "$SECONDS_PER_TARGET" "$SANITIZER"
printf '%-18s %14s %10s %8s\n' target executions corpus crashes
printf '%s\n' "${rows[@]}"
if [ "$total_crashes" -gt 0 ]; then
    echo "fuzz: $total_crashes new crash inputs copied to fuzz/regressions/ (cargo test -p fuzz-targets replays them)"
    exit 1
fi
