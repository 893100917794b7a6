#!/usr/bin/env bash
# Prepares the CUDA check for a bare GPU machine (no Rust, no internet, no venv of ours, a python3
# with torch $TORCH_VERSION+cu13x and transformers): builds here the whisper_parity test binary
# against that torch's headers and libraries and packs it into .gpu/ (ignored by git), with
# .gpu/run.sh to run on the GPU machine from the repository root:
#
#   here:             scripts/gpu-build.sh
#   GPU machine:      bash .gpu/run.sh        (the repository tree plus .gpu/ copied there)
#
# tch 0.26 expects torch 2.13: the version check is bypassed, and the few C++ wrappers of ops
# that the older libtorch lacks raise an error instead (step 2; nothing of ours uses them). The
# binary then loads the GPU machine's own libtorch through LD_LIBRARY_PATH.
#
# Environment: TORCH_VERSION (2.11.0), GPU_BUILD_DIR (/tmp/gpu211: the torch headers and libs
# (about 1 GB), the patched torch-sys, the copy of the workspace and its cargo target dir; not
# the default target/, so that builds there are left alone),
# PY (.venv/bin/python, for pip download), JOBS (2), GPU_BUILD_REV (build that commit instead
# of the working tree as it is, e.g. HEAD while files are being edited).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
WORK=${GPU_BUILD_DIR:-/tmp/gpu211}
PY=${PY:-$REPO/.venv/bin/python}
JOBS=${JOBS:-2}
TARGET=x86_64-unknown-linux-gnu
log() { printf '[gpu-build] %s\n' "$*"; }

# 1. The headers and libraries of the GPU machine's torch (any CUDA variant of the same version
#    has the same headers and exported symbols; the PyPI wheel is the cu13x one).
if [ "$(cat "$WORK/torch/VERSION" 2>/dev/null)" != "$TORCH_VERSION" ] || [ ! -f "$WORK/torch/lib/libtorch_cuda.so" ]; then
    rm -rf "$WORK/torch" "$WORK/dl"
    mkdir -p "$WORK/dl"
    log "pip download torch==$TORCH_VERSION"
    "$PY" -m pip download --quiet --no-deps "torch==$TORCH_VERSION" --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --only-binary=:all: -d "$WORK/dl"
    "$PY" - "$WORK" <<'EOF'
import glob, sys, zipfile
work = sys.argv[1]
wheel = glob.glob(f"{work}/dl/torch-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(("torch/include/", "torch/lib/", "torch/share/"))]
    z.extractall(work, names)
print(f"[gpu-build] {len(names)} files of {wheel.rsplit('/', 1)[-1]} in {work}/torch")
EOF
    rm -rf "$WORK/dl"
    echo "$TORCH_VERSION" >"$WORK/torch/VERSION"
fi

# 2. torch-sys 0.26 with the C++ wrappers of the ops that this libtorch lacks (new in 2.13:
#    _philox_*, _upsample_lanczos2d_aa*, _flash_attention_forward_no_dropout_inplace, and
#    _scaled_dot_product_attention_math_for_mps with an argument more) made to raise an error
#    instead: found by compiling its torch_api_generated.cpp against these headers.
CXXFLAGS_TCH=(-w -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 -DGLOG_USE_GLOG_EXPORT
    -I"$WORK/torch/include" -I"$WORK/torch/include/torch/csrc/api/include")
TORCH_SYS_SRC=$(cargo metadata --locked --format-version 1 --filter-platform "$TARGET" --manifest-path "$REPO/Cargo.toml" \
    | "$PY" -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "torch-sys").rsplit("/", 1)[0])')
if [ "$(cat "$WORK/torch-sys/STUBBED_FOR" 2>/dev/null)" != "$TORCH_VERSION $TORCH_SYS_SRC" ]; then
    rm -rf "$WORK/torch-sys"
    cp -r "$TORCH_SYS_SRC" "$WORK/torch-sys"
    for _ in 1 2 3; do
        errors=$(cd "$WORK/torch-sys" && c++ -fsyntax-only "${CXXFLAGS_TCH[@]}" libtch/torch_api_generated.cpp 2>&1 \
            | grep -o '^libtch/torch_api_generated.cpp:[0-9]*:[0-9]*: error' | cut -d: -f2 || true)
        [ -n "$errors" ] || break
        "$PY" - "$WORK/torch-sys/libtch/torch_api_generated.cpp" "$TORCH_VERSION" $errors <<'EOF'
import re, sys
path, version, error_lines = sys.argv[1], sys.argv[2], sys.argv[3:]
lines = open(path).read().split("\n")
stubbed = set()
# From the end, so that stubbing a function leaves the line numbers of earlier errors valid.
for n in sorted({int(line) - 1 for line in error_lines}, reverse=True):
    start = next(i for i in range(n, -1, -1) if re.match(r"^\S.*\batg_\w+\(", lines[i]))
    name = re.search(r"\b(atg_\w+)\(", lines[start]).group(1)
    if name in stubbed:
        continue
    open_ = next(i for i in range(start, n + 1) if lines[i].strip() == "PROTECT(")
    close = next(i for i in range(n, len(lines)) if lines[i] == "  )")
    lines[open_ + 1:close] = [f'    throw std::runtime_error("{name}: not in libtorch {version}");']
    stubbed.add(name)
open(path, "w").write("\n".join(lines))
print(f"[gpu-build] torch-sys: stubbed {len(stubbed)} wrappers: {' '.join(sorted(stubbed))}")
EOF
    done
    [ -z "$errors" ] || { echo "torch_api_generated.cpp still fails against torch $TORCH_VERSION" >&2; exit 1; }
    (cd "$WORK/torch-sys" && c++ -fsyntax-only "${CXXFLAGS_TCH[@]}" libtch/torch_api.cpp)
    echo "$TORCH_VERSION $TORCH_SYS_SRC" >"$WORK/torch-sys/STUBBED_FOR"
fi

# 3. A copy of the working tree (or of the commit GPU_BUILD_REV) using that torch-sys (the checkout's Cargo.toml and Cargo.lock
#    are left alone), and the test binary built there. shared/build-support keeps libtorch_cuda
#    linked; its CUDA dependencies (libcudart, cuDNN, ...) are not here: they are only resolved
#    on the GPU machine (--allow-shlib-undefined). RUSTFLAGS with an explicit --target apply to
#    the target crates only, not to build scripts.
rm -rf "$WORK/ws"
mkdir -p "$WORK/ws"
if [ -n "${GPU_BUILD_REV:-}" ]; then
    git archive "$GPU_BUILD_REV" | tar -x -C "$WORK/ws"
else
    git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/ws" 2>/dev/null || true
fi
printf '\n[patch.crates-io]\ntorch-sys = { path = "%s" }\n' "$WORK/torch-sys" >>"$WORK/ws/Cargo.toml"
export LIBTORCH="$WORK/torch" LIBTORCH_BYPASS_VERSION_CHECK=1 LIBTORCH_CXX11_ABI=1
export CARGO_TARGET_DIR="$WORK/target"
export RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined"
log "cargo test --no-run (whisper_parity) and cargo build (asr) in $WORK/ws against $LIBTORCH"
(cd "$WORK/ws" && cargo test -p e2e-tests --test whisper_parity --no-run -j "$JOBS" \
    --target "$TARGET" --message-format=json-render-diagnostics >"$WORK/build.json")
(cd "$WORK/ws" && cargo build -p asr --bin asr -j "$JOBS" --target "$TARGET")
BIN=$("$PY" - "$WORK/build.json" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "whisper_parity" and m.get("executable"):
        print(m["executable"])
EOF
)
[ -n "$BIN" ] || { echo "no whisper_parity executable in the cargo output" >&2; exit 1; }
if ! readelf -d "$BIN" | grep -q 'NEEDED.*\[libtorch_cuda.so\]'; then
    echo "$BIN does not link libtorch_cuda.so: CUDA would not be seen" >&2
    exit 1
fi

# 4. The package: the stripped binaries, whisper-large-v2's config, and the scripts that run
#    them on the GPU machine.
mkdir -p .gpu
rm -f .gpu/whisper_parity .gpu/asr
strip -o .gpu/whisper_parity "$BIN"
strip -o .gpu/asr "$WORK/target/$TARGET/debug/asr"
cp "$REPO/../shared/configs/whisper-large-v2.json" .gpu/whisper-large-v2.json 2>/dev/null \
    || log "no ../shared/configs/whisper-large-v2.json: .gpu/train-speed.sh needs one"
cat >.gpu/run.sh <<'EOF'
#!/usr/bin/env bash
# Made by scripts/gpu-build.sh. On a GPU machine without Rust, from the repository root:
# `bash .gpu/run.sh` runs tiny_whisper_cuda_matches_cpu with the machine's own torch (python3,
# or ASR_PYTHON) for libtorch and for the HF reference script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${ASR_PYTHON:-python3}
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
SITE=$(dirname "$(dirname "$TORCH_LIB")")
# The CUDA libraries of the torch wheel (nvidia-* packages), which python's torch preloads itself.
NV=$(ls -d "$SITE"/nvidia/*/lib "$SITE"/nvidia/*/lib64 2>/dev/null | paste -sd: || true)
export LD_LIBRARY_PATH="$TORCH_LIB${NV:+:$NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ASR_PYTHON="$PY" ASR_REPO_ROOT="$PWD" ASR_REQUIRE_CUDA=1
echo "libtorch: $TORCH_LIB"
nvidia-smi -L || true
"$PY" -c 'import torch, transformers; print("python torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "| transformers", transformers.__version__)'
EOF
printf 'echo "test binary built against torch %s"\n' "$TORCH_VERSION" >>.gpu/run.sh
cat >>.gpu/run.sh <<'EOF'
ldd .gpu/whisper_parity | grep -E 'libtorch_cuda|libcudart|not found' || true
exec .gpu/whisper_parity --exact tiny_whisper_cuda_matches_cpu --nocapture --test-threads 1 "$@"
EOF
# The training speed of the recipe's setting (whisper-large-v2, random weights, int8 base, LoRA
# r=4 q/v, batch 4, fp16): `bash .gpu/train-speed.sh` (extra flags go to asr bench train-speed).
head -n "$(grep -n '^echo "libtorch' .gpu/run.sh | cut -d: -f1)" .gpu/run.sh >.gpu/train-speed.sh
cat >>.gpu/train-speed.sh <<'EOF'
exec .gpu/asr bench train-speed --model-config .gpu/whisper-large-v2.json --device cuda "$@"
EOF
chmod +x .gpu/run.sh .gpu/train-speed.sh .gpu/whisper_parity .gpu/asr
log "packed $(du -sh .gpu | cut -f1) in .gpu/ (binary from $BIN)"
log "on the GPU machine, from the repository root: bash .gpu/run.sh; bash .gpu/train-speed.sh"
