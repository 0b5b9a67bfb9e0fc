#!/usr/bin/env bash
# Fuzzes the decoders a peer can reach before the handshake (fuzz/fuzz_targets/frames.rs).
# Usage: scripts/fuzz.sh [seconds]   (default 60). Needs cargo-fuzz; installs it if missing.
# cargo-fuzz wants nightly flags; RUSTC_BOOTSTRAP lets this machine's stable toolchain take them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p fuzz/corpus/frames
RUSTC_BOOTSTRAP=1 cargo fuzz run frames fuzz/corpus/frames -- -max_total_time="$seconds" -rss_limit_mb=2048
