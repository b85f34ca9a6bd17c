#!/usr/bin/env bash
# Build the offline base image imagegen-base:bookworm-<packages hash> (Debian bookworm minbase + python3)
# with debootstrap and `docker import`, for machines where no image can be pulled.
# Idempotent: skipped when the image exists; the rootfs tarball is cached.
# Needs root (debootstrap). Prints the image name.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${IMAGEGEN_DEV_CACHE:-$repo/.cache}/docker
suite=bookworm
# What ComfyUI needs to import and run on CPU: wheels (torch, av, Pillow, scipy, ...)
# bundle their native libraries, so python3 + venv + CA certificates are enough to render.
# Fast mode's torch.compile also needs a C/C++ compiler and Python's headers at run time
# (inductor builds its CPU kernels with g++; Triton builds its GPU launcher with gcc).
packages=python3,python3-venv,ca-certificates,g++,python3-dev
# The package list names the tarball and the image, so changing it rebuilds both.
flavour=$(printf '%s' "$packages" | sha256sum | cut -c1-8)
image=${IMAGEGEN_BASE_IMAGE:-imagegen-base:$suite-$flavour}
tarball=$cache/$suite-minbase-$flavour-rootfs.tar

say() { printf '[docker-base] %s\n' "$*" >&2; }
die() { printf '[docker-base] ERROR: %s\n' "$*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (is dockerd running? try: dockerd > /tmp/dockerd.log 2>&1 &)"
if docker image inspect "$image" >/dev/null 2>&1; then say "$image exists"; echo "$image"; exit 0; fi

# Use the mirror this machine's apt uses: often the only one reachable.
apt_mirror() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v '^[[:space:]]*#' | grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true
}
mirror=${IMAGEGEN_DEBIAN_MIRROR:-$(apt_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

if [ ! -f "$tarball" ]; then
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  mkdir -p "$cache"
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  say "debootstrap $suite (minbase + $packages) from $mirror"
  debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || die "debootstrap failed, see $cache/debootstrap.log"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" --numeric-owner --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -cf "$tarball.partial" . \
    || die "could not pack the rootfs"
  mv "$tarball.partial" "$tarball"
fi

say "docker import $tarball as $image"
docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null \
  || die "docker import failed"
echo "$image"
