#!/usr/bin/env bash
# Installs the system programs the showcase and the tests use, when missing (Debian/Ubuntu):
# ffmpeg (the showcase's thumbnails), chromium and chromium-driver (its browser tests), and
# coreutils' `sleep`/`true` (stand-ins for a task's child and for a program that is no flame app).
set -euo pipefail
missing=()
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
{ command -v sleep >/dev/null && command -v true >/dev/null; } || missing+=(coreutils)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
