#!/usr/bin/env bash
# Builds the local base image for container tests, once per recipe: debootstrap (minbase)
# with the packages below, plus the Node 24 binary, imported with `docker import` (no
# registry can be reached here), from the Debian mirror of the machine's apt configuration
# (scripts/debian-mirror.sh). The tag is a hash of this recipe, so a changed recipe
# builds a new image; `vmdisk-base:current` points at the newest.
# Prints the image tag on stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE_PACKAGES="e2fsprogs,util-linux,mount,fuse3,libnbd-bin,qemu-utils,procps"
SUITE=bookworm
IMAGE=vmdisk-base

provision_node24
recipe_hash=$( (cat "${BASH_SOURCE[0]}"; echo "$NODE_PKG_VERSION") | sha256sum | cut -c1-12)
tag="$IMAGE:$recipe_hash"

if ! docker image inspect "$tag" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { log "missing: debootstrap"; exit 1; }
  # The Debian mirror apt is configured with (the only one these machines can reach).
  mirror=$("$VMDISK_ROOT/scripts/debian-mirror.sh" "$SUITE")
  root=$(mktemp -d /var/tmp/vmdisk-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  log "building the base image $tag (debootstrap $SUITE from $mirror; about a minute)"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 ||
    { tail -20 "$root.log" >&2; log "debootstrap failed (log: $root.log)"; exit 1; }
  rm -f "$root.log"
  install -m 0755 "$NODE_DIR/bin/node" "$root/usr/local/bin/node"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["/bin/bash"]' - "$tag" >/dev/null
  log "built $tag"
fi
docker tag "$tag" "$IMAGE:current"
echo "$tag"
