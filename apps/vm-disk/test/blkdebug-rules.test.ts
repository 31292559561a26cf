// blkdebug's QEMU rule keys side by side with qemu-storage-daemon 7.2: inject-error rules
// armed by an event (read_aio, write_aio, flush_to_disk) in a state, on a sector, once or
// not, and set-state rules moving the state; requests made over an NBD export by qemu-io,
// whose output (errors included) must be the same.
import { execFile } from 'node:child_process';
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { QmpMessage } from './harness/qmp-client.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-blkdebug-');

/** qemu-io's output, whatever its exit status (a failed request is part of the result). */
function qemuIo(cmds: string[]): Promise<string> {
  const uri = `nbd+unix:///d?socket=${scratch.path('nbd.sock')}`;
  return new Promise((resolve) => {
    execFile('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri], (_e, out, err) =>
      resolve(`${out}${err}`),
    );
  });
}

async function io(r: Recorder, cmds: string[]): Promise<void> {
  r.seen.push({ qemuIo: (await qemuIo(cmds)).split('\n') } as QmpMessage);
}

describe('blkdebug with QEMU 7.2 rule keys, as qemu-storage-daemon', () => {
  it('inject-error armed by events and states; set-state moves the state', async () => {
    await sideBySide(scratch, {
      prepare: async () => {
        const img = scratch.path('d.raw');
        await run('qemu-img', ['create', '-q', '-f', 'raw', img, '1M']);
        // Allocated, so that qemu-storage-daemon's NBD server reads it (holes it does not).
        await run('qemu-io', ['-f', 'raw', '-c', 'write -q -P 0x11 0 64k', img]);
      },
      args: () => ['--nbd-server', `addr.type=unix,addr.path=${scratch.path('nbd.sock')}`],
      // The data written is read back by qemu-io (a raw image has nothing else to check).
      results: [],
      scenario: async (r) => {
        const node = (rules: Record<string, unknown>) => ({
          driver: 'raw',
          'node-name': 'd',
          file: {
            driver: 'blkdebug',
            image: { driver: 'file', filename: scratch.path('d.raw') },
            ...rules,
          },
        });
        // A bad event name and a set-state rule without its new state are refused.
        await r.cmd('blockdev-add', node({ 'inject-error': [{ event: 'nope' }] }));
        await r.cmd('blockdev-add', node({ 'set-state': [{ event: 'read_aio' }] }));
        await r.cmd(
          'blockdev-add',
          node({
            'inject-error': [
              { event: 'read_aio', errno: 5, once: true },
              { event: 'read_aio', state: 2, errno: 5, sector: 8 },
              { event: 'flush_to_disk', state: 3, errno: 5, iotype: 'flush' },
            ],
            'set-state': [
              { event: 'write_aio', state: 1, new_state: 2 },
              { event: 'write_aio', state: 2, new_state: 3 },
            ],
          }),
        );
        await r.cmd('block-export-add', {
          type: 'nbd',
          id: 'e',
          'node-name': 'd',
          writable: true,
        });
        // qemu-storage-daemon ends an NBD connection whose read fails: a failing read is
        // the last of its qemu-io run. State 1: the first read fails once, then reads pass.
        await io(r, ['read -q 0 4k']);
        await io(r, ['read -q 0 4k', 'read -q 4k 4k']);
        // A write moves to state 2: reads covering sector 8 fail, every time (the rule is
        // armed again by each read), others pass.
        await io(r, ['write -q -P 0x5a 0 4k', 'read -q 0 4k', 'read -q 4k 4k']);
        await io(r, ['read -q 0 512', 'read -q 4k 4k']);
        // Another write moves to state 3: flushes fail, reads pass.
        await io(r, [
          'write -q -P 0x6b 8k 4k',
          'flush',
          'read -q -P 0x5a 0 4k',
          'read -q -P 0x6b 8k 4k',
          'read -q 4k 4k',
        ]);
        await r.cmd('block-export-del', { id: 'e' });
        await r.cmd('blockdev-del', { 'node-name': 'd' });
      },
    });
  });
});
