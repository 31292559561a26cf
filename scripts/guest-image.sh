#!/usr/bin/env bash
# Builds, once per kernel version and recipe, what the real-guest tests boot
# (docs/testing.md, "QEMU guests"): Debian's kernel (the package linux-image-amd64 depends
# on, fetched with `apt-get download` and unpacked with `dpkg-deb -x`, never installed as
# the host's kernel) and an uncompressed initramfs: busybox-static, the virtio, virtio-blk
# and ext4 modules (loaded by /init in dependency order), and mke2fs, e2fsck and
# util-linux blkdiscard (-z: write zeroes) with their
# shared libraries. fio and its libraries (about 85 MB: Debian's fio links librbd, gluster,
# ICU...) are a second archive, fio.cpio, appended only by runs that need fio: unpacking
# them costs a TCG guest several seconds of boot. /init runs /test.sh, which the harness
# appends as a last cpio archive (apps/vm-disk/test/harness/guest.ts; the kernel unpacks
# concatenated archives in turn), prints markers on the serial console and powers off.
# Output: $VMDISK_GUEST_CACHE (default /var/cache/vm-disk/guest)/<kernel>-<recipe hash>/
# {vmlinuz,initramfs.cpio,fio.cpio,kernel-version}, and the symlink `current` to the newest.
# Usage: scripts/guest-image.sh   (prints the directory on stdout)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CACHE="${VMDISK_GUEST_CACHE:-/var/cache/vm-disk/guest}"
# What the checks need: the virtio PCI transport and virtio-blk, ext4 (crc32c_generic: ext4
# and jbd2 ask the crypto API for "crc32c", which would need modprobe to load on demand).
MODULES=(virtio_pci virtio_blk crc32c_generic ext4)
PROGRAMS=(/usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/blkdiscard)
FIO=/usr/bin/fio

for tool in apt-cache apt-get dpkg-deb cpio ldd; do
  command -v "$tool" >/dev/null || { log "missing: $tool"; exit 1; }
done
[ -x /bin/busybox ] && /bin/busybox --list | grep -x insmod >/dev/null ||
  { log "missing: a static busybox at /bin/busybox (Debian package busybox-static)"; exit 1; }
for p in "${PROGRAMS[@]}" "$FIO"; do [ -x "$p" ] || { log "missing: $p"; exit 1; }; done

# The versioned kernel package behind the metapackage, e.g. linux-image-6.1.0-56-amd64.
kernel_package() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !found {print $2; found = 1}'; }
pkg=$(kernel_package)
# A machine whose package lists were never fetched (or were cleaned) knows no kernel yet.
if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then apt-get update -q >/dev/null; pkg=$(kernel_package); fi
[ -n "$pkg" ] || { log "cannot resolve linux-image-amd64 to a versioned kernel package"; exit 1; }
kver=${pkg#linux-image-}
recipe=$( (cat "${BASH_SOURCE[0]}"; /bin/busybox | head -1; for p in "${PROGRAMS[@]}" "$FIO"; do
  sha256sum "$p"; done) | sha256sum | cut -c1-12)
out="$CACHE/$kver-$recipe"

if [ ! -f "$out/initramfs.cpio" ]; then
  log "building the test guest $kver-$recipe in $CACHE (kernel package $pkg)"
  mkdir -p "$CACHE"
  work=$(mktemp -d "$CACHE/.build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  # apt drops privileges to _apt for downloads; a directory it can write avoids the warning.
  chmod 0777 "$work"
  (cd "$work" && apt-get download -q "$pkg" >/dev/null)
  dpkg-deb -x "$work"/"$pkg"_*.deb "$work/pkg"
  moddir="$work/pkg/lib/modules/$kver"

  root="$work/root"
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,mnt,etc,lib/modules}
  cp /bin/busybox "$root/bin/busybox"
  [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"

  # Modules in dependency order (depth first over `modinfo -F depends`), each once.
  declare -A seen=()
  order=()
  add_module() {
    local name=$1 file dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    file=$(find "$moddir/kernel" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) -print -quit)
    [ -n "$file" ] || { log "module $name not found in $pkg"; exit 1; }
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do add_module "$dep"; done
    cp "$file" "$root/lib/modules/$name.ko"
    order+=("$name")
  }
  for m in "${MODULES[@]}"; do add_module "$m"; done
  printf '%s\n' "${order[@]}" >"$root/lib/modules/order"

  # Programs with the shared libraries ldd resolves, at the same paths, under $1.
  copy_programs() {
    local dest=$1 p f; shift
    for p in "$@"; do
      for f in "$p" $(ldd "$p" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}'); do
        mkdir -p "$dest$(dirname "$f")"
        cp -L "$f" "$dest$f"
      done
    done
  }
  copy_programs "$root" "${PROGRAMS[@]}"
  copy_programs "$work/fio" "$FIO"
  ln -s mke2fs "$root/usr/sbin/mkfs.ext4"

  cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" || echo "VMDISK-GUEST-ERROR insmod $m"
done
echo "VMDISK-GUEST-BOOTED $(cut -d' ' -f1 /proc/uptime)"
if [ -f /test.sh ]; then sh /test.sh; rc=$?; else rc=127; fi
sync
echo "VMDISK-GUEST-EXIT $rc"
poweroff -f
EOF
  chmod 0755 "$root/init"

  mkdir -p "$work/out"
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$work/out/initramfs.cpio"
  (cd "$work/fio" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$work/out/fio.cpio"
  cp "$work/pkg/boot/vmlinuz-$kver" "$work/out/vmlinuz"
  echo "$kver" >"$work/out/kernel-version"
  rm -rf "$out"
  mv "$work/out" "$out"
  log "built $out ($(du -sh "$out/initramfs.cpio" | cut -f1) initramfs; modules: ${order[*]})"
fi
ln -sfn "$(basename "$out")" "$CACHE/current"
echo "$out"
