#!/usr/bin/env bash
# Installs, idempotently, what the tests need beyond npm (docs/testing.md):
# the oracle and container Debian packages, a running Docker engine (no bridge, host
# networking only), the local base image, the Ceph image built from it and the test guest
# (scripts/guest-image.sh). As root with apt it installs what is missing; elsewhere it
# prints exactly what is missing and fails.
# Usage: scripts/setup-test-env.sh   (prints the base image tag on stdout)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

APT_PACKAGES=(qemu-utils qemu-system-common qemu-system-x86 busybox-static cpio libnbd-bin python3-libnbd nbdkit fio docker.io debootstrap e2fsprogs fuse3 openssl graphviz prometheus librbd1 qemu-block-extra iproute2)
RUNTIME_NAME=vmdisk-runc
RUNTIME_PATH=/usr/local/libexec/vm-disk/runc-nosysresource
DOCKERD_LOG=/var/log/vm-disk-dockerd.log

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

ensure_apt_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return
  if ! can_apt; then
    log "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})"
    exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
}

# CAP_SYS_RESOURCE is capability 24: is it in this process's bounding set?
has_cap_sys_resource() {
  local bnd; bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  (( (16#$bnd >> 24) & 1 ))
}

docker_up() { docker info >/dev/null 2>&1; }

ensure_docker() {
  local need_wrapper=0 args=(--bridge=none --iptables=false --ip-masq=false)
  has_cap_sys_resource || need_wrapper=1
  if [ $need_wrapper = 1 ]; then
    if ! cmp -s "$VMDISK_ROOT/scripts/runc-nosysresource" "$RUNTIME_PATH" 2>/dev/null; then
      install -D -m 0755 "$VMDISK_ROOT/scripts/runc-nosysresource" "$RUNTIME_PATH"
    fi
    args+=(--add-runtime "$RUNTIME_NAME=$RUNTIME_PATH" --default-runtime "$RUNTIME_NAME")
  fi
  if ! docker_up; then
    if ! can_apt; then log "no Docker engine is running and this user cannot start one: start dockerd ${args[*]}"; exit 1; fi
    # A dockerd killed without its clean-up (the machine's processes killed at once) leaves
    # its pid file; once another process has that PID, a new dockerd refuses to start.
    local pidfile=/var/run/docker.pid
    if [ -f "$pidfile" ] && [ "$(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null)" != dockerd ]; then
      log "removing $pidfile left by a dockerd that is gone"
      rm -f "$pidfile"
    fi
    log "starting the Docker engine: dockerd ${args[*]}"
    setsid nohup dockerd "${args[@]}" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local i
    for i in $(seq 1 120); do docker_up && break; sleep 0.5; done
    docker_up || { log "dockerd did not come up; its log: $DOCKERD_LOG"; tail -20 "$DOCKERD_LOG" >&2; exit 1; }
  fi
  if [ $need_wrapper = 1 ] && [ "$(docker info --format '{{.DefaultRuntime}}')" != "$RUNTIME_NAME" ]; then
    log "the running Docker engine cannot start privileged containers here (CAP_SYS_RESOURCE is not in the bounding set):"
    log "stop it and run this script again, or restart it with: dockerd ${args[*]}"
    exit 1
  fi
}

ensure_apt_packages
ensure_node
ensure_docker
base=$("$VMDISK_ROOT/scripts/base-image.sh")
"$VMDISK_ROOT/scripts/guest-image.sh" >/dev/null
# The Ceph image the RBD tests start a cluster from (built from the base image).
"$VMDISK_ROOT/scripts/ceph-image.sh" "$base" >/dev/null
echo "$base"
