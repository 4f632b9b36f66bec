#!/usr/bin/env bash
# Build tasuki-example:latest from Debian's static busybox (package busybox-static).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
image=${TASUKI_EXAMPLE_IMAGE:-tasuki-example:latest}
docker=${DOCKER:-docker}
busybox=${BUSYBOX:-/bin/busybox}
if ! file_out=$(LC_ALL=C od -An -c -N4 "$busybox" 2>/dev/null) || [[ "$file_out" != *E*L*F* ]]; then
  echo "build.sh: $busybox is missing; install Debian's busybox-static" >&2
  exit 1
fi
if ldd "$busybox" >/dev/null 2>&1; then
  echo "build.sh: $busybox is dynamically linked; a FROM-scratch image needs busybox-static" >&2
  exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$ctx/Dockerfile"
cp "$busybox" "$ctx/busybox"
DOCKER_BUILDKIT=0 "$docker" build -q -t "$image" "$ctx" >/dev/null
echo "built $image"
