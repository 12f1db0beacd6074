#!/usr/bin/env bash
# Builds local stand-ins for the registry base images, for hosts that reach no image
# registry (CI) — a host that can pull python:3.11-slim-bookworm and postgres:15 does not
# need this:
#   imaker-standin/debian:bookworm              debootstrap --variant=minbase + docker import
#   imaker-standin/python:3.11-slim-bookworm    Debian's python3.11 (PYTHON_IMAGE build-arg)
#   imaker-standin/postgres:15                  Debian's postgresql-15 (POSTGRES_IMAGE)
# The Debian base is made only when its image is missing (FORCE_DEBOOTSTRAP=1 redoes it);
# the other two come from the layer cache when unchanged. Needs root (debootstrap) and a
# Debian mirror (DEBIAN_MIRROR). DOCKER= the client (default: Debian's /usr/bin/docker,
# which builds with BuildKit without buildx).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
DOCKER=${DOCKER:-$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker )}
PREFIX=${STANDIN_PREFIX:-imaker-standin}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DOCKER_BUILDKIT=1
t0=$(date +%s)

debian="$PREFIX/debian:bookworm"
if [ "${FORCE_DEBOOTSTRAP:-0}" = "1" ] || ! "$DOCKER" image inspect "$debian" >/dev/null 2>&1; then
    root=$(mktemp -d /var/tmp/imaker-debootstrap.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bookworm "$root/rootfs" "$MIRROR" >"$root/log" 2>&1 \
        || { tail -20 "$root/log"; exit 1; }
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" \
        > "$root/rootfs/etc/apt/sources.list"
    rm -rf "$root/rootfs/var/cache/apt/archives/"*.deb "$root/rootfs/var/lib/apt/lists/"*
    tar -C "$root/rootfs" -c . | "$DOCKER" import - "$debian" >/dev/null
    rm -rf "$root"; trap - EXIT
    echo "[standins] $debian: debootstrap + import $(( $(date +%s) - t0 )) s"
else
    echo "[standins] $debian: present (kept)"
fi

t1=$(date +%s)
"$DOCKER" build -q --build-arg DEBIAN_IMAGE="$debian" -f "$here/python.Dockerfile" \
    -t "$PREFIX/python:3.11-slim-bookworm" "$here" >/dev/null
echo "[standins] $PREFIX/python:3.11-slim-bookworm: $(( $(date +%s) - t1 )) s"
t2=$(date +%s)
"$DOCKER" build -q --build-arg DEBIAN_IMAGE="$debian" -f "$here/postgres.Dockerfile" \
    -t "$PREFIX/postgres:15" "$here" >/dev/null
echo "[standins] $PREFIX/postgres:15: $(( $(date +%s) - t2 )) s"
