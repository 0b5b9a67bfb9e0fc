#!/usr/bin/env bash
# Runs the chaos workload (calls, heavy calls, cancels, channels; runners SIGKILLed and
# SIGSTOPped) for MINUTES, then prints calls by outcome, runner boots, the parent's RSS and open
# descriptors at start and end, and runner processes left. Fails if descriptors or RSS grew past
# their bounds (tests/soak.rs) or a runner process is left. Not part of CI.
#   scripts/soak.sh 30
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:?usage: scripts/soak.sh MINUTES}"
FLAME_SOAK_MINUTES="$minutes" cargo test --release --locked -p flame-tests --test soak -- \
  --ignored --nocapture --test-threads 1
