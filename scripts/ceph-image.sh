#!/usr/bin/env bash
# Builds the local Ceph image for the RBD tests, once per recipe: the base image
# (scripts/base-image.sh) with Debian's ceph-mon, ceph-osd, ceph-mgr and ceph-common
# installed by apt inside a host-network container (with this machine's apt sources and
# configuration, the only mirror it can reach), committed as an image. The tag is a hash
# of this recipe and the base image, so either changing builds a new one;
# `vmdisk-ceph:current` points at the newest.
# Usage: scripts/ceph-image.sh BASE_TAG   (prints the Ceph image tag on stdout)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CEPH_PACKAGES="ceph-mon ceph-osd ceph-mgr ceph-common"
IMAGE=vmdisk-ceph
base="${1:?usage: ceph-image.sh BASE_TAG}"

recipe_hash=$( (cat "${BASH_SOURCE[0]}"; docker image inspect -f '{{.Id}}' "$base") | sha256sum | cut -c1-12)
tag="$IMAGE:$recipe_hash"

if ! docker image inspect "$tag" >/dev/null 2>&1; then
  name="vmdisk-ceph-build-$$"
  eval "$(apt-config shell SOURCELIST Dir::Etc::sourcelist/f SOURCEPARTS Dir::Etc::sourceparts/d CONFPARTS Dir::Etc::parts/d)"
  log "building the Ceph image $tag from $base (apt-get install $CEPH_PACKAGES; about two minutes)"
  # The host's sources, apt configuration and keyrings, read-only, copied in before apt runs.
  mounts=(-v "$SOURCEPARTS:/host-apt/sources.list.d:ro" -v "$CONFPARTS:/host-apt/apt.conf.d:ro"
    -v /usr/share/keyrings:/host-apt/keyrings:ro)
  [ -f "$SOURCELIST" ] && mounts+=(-v "$SOURCELIST:/host-apt/sources.list:ro")
  trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
  docker run --name "$name" --network host "${mounts[@]}" "$base" sh -ec "
    rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*
    [ -f /host-apt/sources.list ] && cp /host-apt/sources.list /etc/apt/sources.list
    cp /host-apt/sources.list.d/*.sources /host-apt/sources.list.d/*.list /etc/apt/sources.list.d/ 2>/dev/null || true
    cp /host-apt/apt.conf.d/* /etc/apt/apt.conf.d/ 2>/dev/null || true
    cp -n /host-apt/keyrings/* /usr/share/keyrings/
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends $CEPH_PACKAGES
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  " >"/var/tmp/$name.log" 2>&1 ||
    { tail -20 "/var/tmp/$name.log" >&2; log "the Ceph image build failed (log: /var/tmp/$name.log)"; exit 1; }
  rm -f "/var/tmp/$name.log"
  docker commit -c 'CMD ["/bin/bash"]' "$name" "$tag" >/dev/null
  log "built $tag"
fi
docker tag "$tag" "$IMAGE:current"
echo "$tag"
