#!/usr/bin/env bash
# Fuzzes what a peer can reach. Usage: scripts/fuzz.sh [seconds] [target]   (default 60, frames)
#   frames: the decoders and handshake checks a stranger reaches before proving itself;
#   runner: a stranger's bytes during a boot, then a runner holding the token saying anything:
#           the listener's handshake, the parent's per-connection loop, channel reassembly.
# Needs cargo-fuzz; installs it if missing. cargo-fuzz wants nightly flags; RUSTC_BOOTSTRAP lets
# this machine's stable toolchain take them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
target="${2:-frames}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p "fuzz/corpus/$target"
# Scripts of any length from the start: a runner target's input runs a whole session (~30 ms),
# too slow for libFuzzer's default of growing the length a few bytes at a time.
RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=60 -len_control=0 -max_len=2048
