#!/usr/bin/env bash
# Installs the system programs the showcase and the tests use, when missing (Debian/Ubuntu):
# ffmpeg (the showcase's thumbnails), chromium and chromium-driver (its browser tests), coreutils'
# `sleep`/`true` (stand-ins for a task's child and for a program that is no flame app), and the
# Docker engine (the Docker and Kubernetes backends' tests), which it also starts when it is not
# running, PostgreSQL's server binaries (the showcase's gallery on Postgres), and kubectl (the
# Kubernetes tests run it against their API emulator).
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
{ command -v sleep >/dev/null && command -v true >/dev/null; } || missing+=(coreutils)
command -v ldd >/dev/null || missing+=(libc-bin)
command -v dockerd >/dev/null || missing+=(docker.io)
# The showcase's gallery on Postgres: its test starts a private server from these binaries.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v runuser >/dev/null || missing+=(util-linux)
# The Kubernetes backend's tests check the API emulator against the real client.
command -v kubectl >/dev/null || missing+=(kubernetes-client)
# The Kubernetes emulator's tests call the API from inside a pod with curl.
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "starting the Docker engine (log: /var/log/flame-dockerd.log)"
  $sudo sh -c 'nohup dockerd >/var/log/flame-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  # Only the Docker backend's tests need it: the showcase runs without.
  docker info >/dev/null 2>&1 ||
    echo "warning: the Docker engine did not start (see /var/log/flame-dockerd.log); the Docker backend's tests will fail saying so" >&2
fi
