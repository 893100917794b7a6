#!/usr/bin/env bash
# Dependency audit (run by the test command): cargo-audit over Cargo.lock and fuzz/Cargo.lock
# against the RustSec advisory database vendored in third_party/rustsec-advisory-db (this
# machine and CI cannot reach GitHub, where the database lives). Accepted advisories, each
# with its reason, are in .cargo/audit.toml; anything else fails. cargo-audit itself is
# built once from crates.io into ~/.cache/asr-lora/cargo-audit-<version>, unoptimised and without
# debug info: 3.3 minutes on two cores instead of 6.8 for a release build, and an audit takes
# 2.6 s instead of 0.6.
#   scripts/audit.sh            audit
#   scripts/audit.sh --update   refresh the vendored database first (needs GitHub)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.22.2
DB=third_party/rustsec-advisory-db
ROOT="${ASR_CACHE:-$HOME/.cache/asr-lora}/cargo-audit-$VERSION"
AUDIT="$ROOT/bin/cargo-audit"

if [ "${1:-}" = "--update" ]; then
    tmp=$(mktemp -d)
    git clone -q --depth 1 https://github.com/rustsec/advisory-db "$tmp/db"
    rm -rf "$DB/crates" "$DB/rust"
    cp -r "$tmp/db/crates" "$tmp/db/rust" "$tmp/db/LICENSE.txt" "$DB/"
    echo "$(git -C "$tmp/db" log -1 --format='%H %cI')" >"$DB/SNAPSHOT"
    rm -rf "$tmp"
fi

if [ ! -x "$AUDIT" ]; then
    echo "[audit] building cargo-audit $VERSION into $ROOT (once)"
    build=$(mktemp -d)
    CARGO_TARGET_DIR="$build" CARGO_PROFILE_DEV_DEBUG=0 cargo install -q --locked --debug \
        cargo-audit --version "$VERSION" --root "$ROOT.tmp.$$"
    rm -rf "$build" "$ROOT"
    mv -T "$ROOT.tmp.$$" "$ROOT"
fi

echo "[audit] advisory database snapshot: $(cat "$DB/SNAPSHOT")"
for lock in Cargo.lock fuzz/Cargo.lock; do
    # The yanked check reads cargo's local index cache: fetch the lock's crates into it first
    # (without this, crates only the fuzz lock names were reported as "not found").
    cargo fetch -q --locked --manifest-path "${lock%Cargo.lock}Cargo.toml"
    "$AUDIT" audit --no-fetch --db "$DB" --file "$lock"
done
