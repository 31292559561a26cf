// A backup copies in clusters of the target's cluster size when it is above 64 KiB (QEMU
// 7.2 block_copy_calculate_cluster_size), side by side with qemu-storage-daemon: an
// incremental backup of one 4 KiB write into a target of 1 MiB clusters copies 1 MiB (the
// job's len), and the target holds that one cluster.
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import { sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-backup-cs-');
const p = (name: string): string => scratch.path(name);

function node(name: string): string[] {
  const file = { driver: 'file', filename: p(`${name}.qcow2`) };
  return ['--blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': name, file })];
}

describe("backup's cluster size", () => {
  it("follows the target's cluster size above 64 KiB", async () => {
    await sideBySide(scratch, {
      prepare: async () => {
        await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('src.qcow2'), '4M']);
        await run('qemu-img', ['bitmap', '--add', p('src.qcow2'), 'b0']);
        await run('qemu-io', ['-c', 'write -P 0x11 1028k 4k', p('src.qcow2')]);
        await run('qemu-img', [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-o',
          'cluster_size=1M',
          p('inc.qcow2'),
          '4M',
        ]);
      },
      args: () => [...node('src'), ...node('inc')],
      results: ['inc.qcow2'],
      scenario: async (r) => {
        await r.cmd('blockdev-backup', {
          'job-id': 'j',
          device: 'src',
          target: 'inc',
          sync: 'incremental',
          bitmap: 'b0',
        });
        await r.until('JOB_STATUS_CHANGE', 'null');
      },
    });
  });
});
