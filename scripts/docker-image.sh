#!/usr/bin/env bash
# Builds a minimal image of a flame app without pulling anything: `FROM scratch` with the app's
# binary as /app, the programs it runs (ffmpeg, say) in /usr/bin, and the shared libraries `ldd`
# says each one loads. For engines that cannot reach a registry; with one, a Dockerfile that
# starts from a distribution image does the same (docs/deploy-docker.md).
#
# usage: scripts/docker-image.sh TAG BINARY [PROGRAM...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TAG BINARY [PROGRAM...]" >&2
  exit 2
fi
tag=$1
binary=$2
shift 2
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

copy() { # copy FILE DEST: the file's contents (symlinks followed) at DEST in the image
  mkdir -p "$context$(dirname "$2")"
  cp -L "$1" "$context$2"
}
libraries() { ldd "$1" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'; }

copy "$binary" /app
libraries "$binary" | while read -r lib; do copy "$lib" "$lib"; done
for program in "$@"; do
  path=$(command -v "$program") || { echo "$program: not found" >&2; exit 1; }
  copy "$path" "/usr/bin/$(basename "$path")"
  libraries "$path" | while read -r lib; do copy "$lib" "$lib"; done
done
mkdir -p "$context/tmp"
chmod 1777 "$context/tmp"
printf 'Dockerfile\n.dockerignore\n' >"$context/.dockerignore"
cat >"$context/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY . /
ENV PATH=/usr/bin
ENTRYPOINT ["/app"]
DOCKERFILE
docker build --quiet --tag "$tag" "$context" 2>/dev/null || docker build --tag "$tag" "$context"
