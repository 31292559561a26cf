// Boots a real QEMU guest (Debian's kernel and the busybox initramfs that
// scripts/guest-image.sh builds) on a vhost-user-blk socket, runs a shell script in it and
// returns what it printed on the serial console. The guest's /init loads the virtio and
// ext4 modules, prints `VMDISK-GUEST-BOOTED <uptime>`, runs /test.sh, prints
// `VMDISK-GUEST-EXIT <status>` and powers off; the script reports with lines
// `VMDISK-RESULT <name> <value>`. docs/testing.md, "QEMU guests", says how it is built.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Where scripts/guest-image.sh leaves the kernel and initramfs (`current` is the newest). */
export function guestImageDir(): string {
  return (
    process.env.VMDISK_GUEST_DIR ??
    join(process.env.VMDISK_GUEST_CACHE ?? '/var/cache/vm-disk/guest', 'current')
  );
}

/**
 * Hardware KVM (kvm_intel or kvm_amd loaded). /dev/kvm alone is not enough: on machines
 * with a software-only KVM (PVM) QEMU's `-accel kvm` aborts, and guests run under TCG.
 */
export function hasHardwareKvm(): boolean {
  return existsSync('/sys/module/kvm_intel') || existsSync('/sys/module/kvm_amd');
}

export interface GuestOptions {
  /** The vhost-user-blk server's unix socket (the guest's /dev/vda). */
  vhostSocket: string;
  /** Shell script run as /test.sh by busybox sh in the guest. */
  script: string;
  /** Guest memory (shared memfd, as vhost-user needs): default 512 MiB. */
  memMiB?: number;
  /** Kills QEMU after this long: default 180 s. */
  timeoutMs?: number;
  /**
   * More vhost-user-blk servers' sockets: /dev/vdb, /dev/vdc, ... in this order (devices
   * on consecutive PCI slots after /dev/vda's), each with `numQueues` and `reconnect`.
   */
  moreVhostSockets?: string[];
  /** The device's `num-queues` (default 1). */
  numQueues?: number;
  /** vCPUs (default 1). */
  cpus?: number;
  /** Adds fio and its libraries to the initramfs (about 85 MB more to unpack at boot). */
  fio?: boolean;
  /** `reconnect=1` on the socket chardev: the device reconnects after the server restarts. */
  reconnect?: boolean;
  /** Runs QEMU as `taskset -c CPU qemu-system-x86_64 ...`. */
  cpuAffinity?: number;
  /** Also writes the serial console to this file. */
  serialLog?: string;
  /**
   * Called with each line of the serial console as it arrives; `console.send` types text
   * on the guest's serial console (the script reads it with `read`).
   */
  onLine?: (line: string, console: GuestConsole) => void;
}

export interface GuestConsole {
  send(text: string): void;
}

export interface GuestRun {
  /** The serial console (kernel messages and the script's output), `\r` removed. */
  log: string;
  /** `VMDISK-RESULT <name> <value>` lines: the last value of each name. */
  results: Map<string, string>;
  /** The script's exit status. */
  status: number;
  /** Milliseconds from QEMU's start to the guest's `VMDISK-GUEST-BOOTED`. */
  bootMs: number;
  /** Milliseconds from QEMU's start to its exit. */
  totalMs: number;
}

const MARK_BOOTED = 'VMDISK-GUEST-BOOTED';
const MARK_EXIT = 'VMDISK-GUEST-EXIT';
const MARK_RESULT = 'VMDISK-RESULT';

/**
 * A cpio archive in the "newc" format the kernel unpacks; appended to the base initramfs
 * (the kernel unpacks concatenated archives in turn, later files replacing earlier ones).
 */
export function cpioNewc(files: { name: string; data: Buffer; mode?: number }[]): Buffer {
  const parts: Buffer[] = [];
  const pad4 = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  const entry = (name: string, data: Buffer, mode: number, ino: number) => {
    const fields = [ino, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, name.length + 1, 0];
    const header = `070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}`;
    const head = Buffer.concat([Buffer.from(header, 'latin1'), Buffer.from(`${name}\0`)]);
    parts.push(head, pad4(head.length), data, pad4(data.length));
  };
  files.forEach((f, i) => {
    entry(f.name, f.data, 0o100000 | (f.mode ?? 0o755), i + 1);
  });
  entry('TRAILER!!!', Buffer.alloc(0), 0, 0);
  return Buffer.concat(parts);
}

function qemuArgs(o: GuestOptions, dir: string, initrd: string): string[] {
  const mem = o.memMiB ?? 512;
  const serial = ['stdio', 'id=ser0', 'signal=off'];
  if (o.serialLog !== undefined) serial.push(`logfile=${o.serialLog}`);
  const disks = [o.vhostSocket, ...(o.moreVhostSockets ?? [])].flatMap((path, i) => {
    const chardev = ['socket', `id=c${i}`, `path=${path}`];
    if (o.reconnect) chardev.push('reconnect=1');
    return [
      '-chardev',
      chardev.join(','),
      '-device',
      `vhost-user-blk-pci,chardev=c${i},num-queues=${o.numQueues ?? 1}`,
    ];
  });
  return [
    ...(hasHardwareKvm() ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg', '-cpu', 'max']),
    '-m',
    `${mem}M`,
    '-smp',
    String(o.cpus ?? 1),
    '-object',
    `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    '-numa',
    'node,memdev=mem',
    '-nodefaults',
    '-display',
    'none',
    '-no-reboot',
    '-chardev',
    serial.join(','),
    '-serial',
    'chardev:ser0',
    '-kernel',
    join(dir, 'vmlinuz'),
    '-initrd',
    initrd,
    // panic=-1 with -no-reboot: a panic (an /init that fails) ends QEMU at once.
    '-append',
    'console=ttyS0 panic=-1 quiet',
    ...disks,
  ];
}

/**
 * Boots the guest, runs `script`, and resolves when QEMU exits after the script's end
 * marker. Rejects, with the serial console in the message, when the script exits non-zero,
 * the guest ends without the marker, or `timeoutMs` passes (QEMU is then killed).
 */
export async function runGuest(o: GuestOptions): Promise<GuestRun> {
  const dir = guestImageDir();
  if (!existsSync(join(dir, 'initramfs.cpio'))) {
    throw new Error(`no test guest in ${dir}: run scripts/guest-image.sh (as root)`);
  }
  const scratch = mkdtempSync(join(tmpdir(), 'vmdisk-guest-'));
  const initrd = join(scratch, 'initrd.cpio');
  writeFileSync(
    initrd,
    Buffer.concat([
      readFileSync(join(dir, 'initramfs.cpio')),
      ...(o.fio ? [readFileSync(join(dir, 'fio.cpio'))] : []),
      cpioNewc([{ name: 'test.sh', data: Buffer.from(o.script) }]),
    ]),
  );
  const started = Date.now();
  let bootMs = -1;
  let log = '';
  let partial = '';
  try {
    const args = qemuArgs(o, dir, initrd);
    const [cmd, argv] =
      o.cpuAffinity === undefined
        ? ['qemu-system-x86_64', args]
        : ['taskset', ['-c', String(o.cpuAffinity), 'qemu-system-x86_64', ...args]];
    const child = spawn(cmd, argv, {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const guestConsole: GuestConsole = { send: (text) => child.stdin.write(text) };
    child.stdin.on('error', () => {}); // QEMU gone: its exit is reported below
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      const text = d.replaceAll('\r', '');
      log += text;
      const lines = (partial + text).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) {
        if (bootMs < 0 && line.startsWith(MARK_BOOTED)) bootMs = Date.now() - started;
        o.onLine?.(line, guestConsole);
      }
    });
    const timeoutMs = o.timeoutMs ?? 180_000;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    const exit = await new Promise<number | string>((resolve) => {
      child.on('exit', (code, signal) => resolve(code ?? signal ?? -1));
      child.on('error', (e) => resolve(`not started: ${e.message}`));
    });
    clearTimeout(timer);
    const totalMs = Date.now() - started;
    const fail = (why: string) =>
      new Error(`guest ${why}\n--- qemu stderr ---\n${stderr}\n--- serial console ---\n${log}`);
    if (timedOut) throw fail(`timed out after ${timeoutMs} ms (QEMU killed)`);
    const end = log.match(new RegExp(`^${MARK_EXIT} (\\d+)$`, 'm'));
    if (!end) throw fail(`ended without ${MARK_EXIT} (QEMU exit ${exit})`);
    const status = Number(end[1]);
    if (status !== 0) throw fail(`script exited with status ${status}`);
    const results = new Map<string, string>();
    for (const m of log.matchAll(new RegExp(`^${MARK_RESULT} (\\S+) ?(.*)$`, 'gm'))) {
      results.set(m[1] as string, m[2] as string);
    }
    return { log, results, status, bootMs, totalMs };
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}
