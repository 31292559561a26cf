// A real QEMU guest (Debian's kernel, busybox initramfs: harness/guest.ts) on a
// vhost-user-blk export of a qcow2 image: patterns written with dd and read back after
// dropping the page cache, write-zeroes and discard, an ext4 filesystem made, filled,
// remounted and fsck'd, all in the guest, with a restart of the server in the middle (the
// device reconnects); then, with the guest and the server stopped, the host's view of the
// image (qemu-img check, convert, map; e2fsck) must match what the guest saw. Two queues,
// two vCPUs. The same script runs against each server of the table.
import { createHash } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import { runGuest } from './harness/guest.ts';
import { QSD, type VhostDaemon, type VhostServer, VM_DISK } from './harness/vhost-servers.ts';

const SERVERS: VhostServer[] = [QSD, VM_DISK];

const MiB = 1 << 20;
const DISK = 64 * MiB;
// The disk's layout: an ext4 filesystem in the first 32 MiB, patterns after it.
const P1 = { offset: 36 * MiB, length: 4 * MiB }; // O_DIRECT, 1 MiB requests
const P2 = { offset: 90_001 * 512, length: 3000 * 512 }; // O_DIRECT, 512-byte requests
const P3 = { offset: 48 * MiB, length: 4 * MiB }; // page cache, then fsync
const DISCARDED = { offset: 52 * MiB, length: 2 * MiB }; // written, then discarded
const ZEROED = { offset: 56 * MiB, length: 2 * MiB }; // written, then write-zeroes

const SCRIPT = `
set -e
dev=/dev/vda
r() { echo "VMDISK-RESULT $*"; }
q=/sys/block/vda/queue
r size $(blockdev --getsize64 $dev)
r write_cache $(tr ' ' _ < $q/write_cache)
# qemu-storage-daemon starts write-through (config wce=0); the guest turns the write cache
# on through the config space (VIRTIO_BLK_F_CONFIG_WCE), so that it sends FLUSH.
echo "write back" > /sys/block/vda/cache_type
r write_cache_set $(tr ' ' _ < $q/write_cache)
r discard_max $(cat $q/discard_max_bytes)
r write_zeroes_max $(cat $q/write_zeroes_max_bytes)
r queues $(ls /sys/block/vda/mq | wc -l)

head -c ${P1.length} /dev/urandom > /tmp/p1
head -c ${P2.length} /dev/urandom > /tmp/p2
head -c ${P3.length + 8 * MiB} /dev/urandom > /tmp/p3
# One writer per vCPU: blk-mq maps each CPU to its own virtqueue, so both queues carry I/O.
taskset 1 dd if=/tmp/p1 of=$dev bs=1M seek=${P1.offset / MiB} oflag=direct 2>/dev/null
taskset 2 dd if=/tmp/p2 of=$dev bs=512 seek=${P2.offset / 512} oflag=direct 2>/dev/null
dd if=/tmp/p3 of=$dev bs=1M seek=${P3.offset / MiB} conv=fsync 2>/dev/null
/usr/sbin/blkdiscard -o ${DISCARDED.offset} -l ${DISCARDED.length} $dev
/usr/sbin/blkdiscard -z -o ${ZEROED.offset} -l ${ZEROED.length} $dev

sync
# The host restarts the server when it reads this line, and types "go" once the new one
# listens: the device reconnects (reconnect=1), and what was written must still be there.
echo VMDISK-RESTART-SERVER
read -r go
r restarted $go
echo 3 > /proc/sys/vm/drop_caches
# Read back through the device: the md5 of each range, as the guest sees it.
back() { dd if=$dev bs=512 skip=$(($1 / 512)) count=$(($2 / 512)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1; }
r p1_written $(md5sum < /tmp/p1 | cut -d' ' -f1)
r p1_read $(back ${P1.offset} ${P1.length})
r p2_written $(md5sum < /tmp/p2 | cut -d' ' -f1)
r p2_read $(back ${P2.offset} ${P2.length})
r p3_written $(head -c ${P3.length} /tmp/p3 | md5sum | cut -d' ' -f1)
r p3_read $(back ${P3.offset} ${P3.length})
r zeroed_read $(back ${ZEROED.offset} ${ZEROED.length})

/usr/sbin/mkfs.ext4 -q -F $dev 32M
mkdir -p /mnt/fs
mount -t ext4 $dev /mnt/fs
for i in 1 2 3 4; do head -c $((i * 300000)) /dev/urandom > /mnt/fs/file$i; done
mkdir /mnt/fs/dir
cp /tmp/p1 /mnt/fs/dir/p1
(cd /mnt/fs && md5sum file1 file2 file3 file4 dir/p1) > /tmp/sums
rm /mnt/fs/file2
fstrim /mnt/fs
umount /mnt/fs
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro $dev /mnt/fs
(cd /mnt/fs && grep -v file2 /tmp/sums | md5sum -c -s) && r files_ok yes
[ ! -e /mnt/fs/file2 ] && r file2_removed yes
umount /mnt/fs
/usr/sbin/e2fsck -fn $dev > /tmp/fsck 2>&1 && r fsck_clean yes || cat /tmp/fsck

sync
echo 3 > /proc/sys/vm/drop_caches
r disk_md5 $(md5sum $dev | cut -d' ' -f1)
`;

const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');
const range = (b: Buffer, r: { offset: number; length: number }) =>
  b.subarray(r.offset, r.offset + r.length);

describe.each(SERVERS)('a real guest on $name vhost-user-blk export', (server) => {
  const scratch = useScratch('vmdisk-guest-');

  it('writes, reconnects, reads back, discards, zeroes, keeps ext4 clean; the host agrees', async () => {
    const image = scratch.path('disk.qcow2');
    const socket = scratch.path('vhost.sock');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(DISK)]);
    const exported = { image, format: 'qcow2', socket, numQueues: 2 };
    let daemon: VhostDaemon = await server.start(exported);
    const restart = async () => {
      await daemon.stop();
      rmSync(socket, { force: true });
      daemon = await server.start(exported);
    };
    let guest: Awaited<ReturnType<typeof runGuest>>;
    try {
      // Two vCPUs, so that the guest uses both queues.
      guest = await runGuest({
        cpus: 2,
        numQueues: 2,
        vhostSocket: socket,
        script: SCRIPT,
        serialLog: scratch.path('serial.log'),
        // A TCG boot takes 20 to 60 s on a busy 2-core machine.
        timeoutMs: 300_000,
        reconnect: true,
        onLine: (line, guestConsole) => {
          if (line !== 'VMDISK-RESTART-SERVER') return;
          restart().then(
            () => guestConsole.send('go\n'),
            (e: Error) => guestConsole.send(`failed:${e.message.replace(/\s+/g, '_')}\n`),
          );
        },
      });
    } finally {
      await daemon.stop();
    }
    const r = guest.results;
    expect(r.get('size')).toBe(String(DISK));
    expect(r.get('queues')).toBe('2');
    expect(r.get('restarted')).toBe('go');
    expect(r.get('write_cache')).toBe('write_through'); // as qemu-storage-daemon 7.2 starts
    expect(r.get('write_cache_set')).toBe('write_back'); // the guest sends FLUSH
    expect(Number(r.get('discard_max'))).toBeGreaterThan(0);
    expect(Number(r.get('write_zeroes_max'))).toBeGreaterThan(0);
    expect(r.get('p1_read')).toBe(r.get('p1_written'));
    expect(r.get('p2_read')).toBe(r.get('p2_written'));
    expect(r.get('p3_read')).toBe(r.get('p3_written'));
    expect(r.get('zeroed_read')).toBe(md5(Buffer.alloc(ZEROED.length)));
    expect(r.get('files_ok')).toBe('yes');
    expect(r.get('file2_removed')).toBe('yes');
    expect(r.get('fsck_clean')).toBe('yes');

    // The host's view, with the server gone.
    await run('qemu-img', ['check', '-q', '-f', 'qcow2', image]);
    const raw = scratch.path('disk.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
    const content = readFileSync(raw);
    expect(md5(content)).toBe(r.get('disk_md5'));
    expect(md5(range(content, P1))).toBe(r.get('p1_written'));
    expect(md5(range(content, P2))).toBe(r.get('p2_written'));
    expect(md5(range(content, P3))).toBe(r.get('p3_written'));
    expect(range(content, ZEROED).equals(Buffer.alloc(ZEROED.length))).toBe(true);
    // The discard reached the image: the range written before it holds no data now.
    const map = JSON.parse(
      await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', image]),
    ) as { start: number; length: number; data: boolean }[];
    const overlapping = map.filter(
      (e) => e.start < DISCARDED.offset + DISCARDED.length && e.start + e.length > DISCARDED.offset,
    );
    expect(overlapping.every((e) => !e.data)).toBe(true);
    // The filesystem, checked by the host's e2fsck on the raw copy.
    await run('e2fsck', ['-fn', raw]);
    console.log(
      `${server.name}: guest booted in ${guest.bootMs} ms, ran in ${guest.totalMs} ms in all`,
    );
  }, 400_000);
});
