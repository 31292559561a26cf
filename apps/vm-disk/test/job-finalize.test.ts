// job-finalize side by side with qemu-storage-daemon 7.2: the transaction finalizes within
// the command, so BLOCK_JOB_COMPLETED and the status changes come before the reply.
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import { sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-job-finalize-');

describe('job-finalize as qemu-storage-daemon 7.2', () => {
  it("sends the job's end before its reply", async () => {
    await sideBySide(scratch, {
      prepare: async () => {
        const base = scratch.path('base.qcow2');
        await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
        await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 1M', base]);
        await run('qemu-img', [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-b',
          base,
          '-F',
          'qcow2',
          scratch.path('top.qcow2'),
        ]);
      },
      args: () => [
        '--blockdev',
        `driver=qcow2,node-name=base,file.driver=file,file.filename=${scratch.path('base.qcow2')}`,
        '--blockdev',
        `driver=qcow2,node-name=top,backing=base,file.driver=file,file.filename=${scratch.path('top.qcow2')}`,
      ],
      results: ['top.qcow2'],
      scenario: async (r) => {
        await r.cmd('block-stream', { 'job-id': 's', device: 'top', 'auto-finalize': false });
        await r.until('JOB_STATUS_CHANGE', 'pending');
        await r.cmd('job-finalize', { id: 's' });
        await r.cmd('query-jobs');
      },
    });
  });
});
