import { type Job, JobRegistry } from '@vmdisk/ao';
import { describe, expect, it } from 'vitest';
import { blockStream } from '../src/index.ts';
import { graphPerTest, sh } from './helpers.ts';

const t = graphPerTest('vmdisk-job-drain-');

const { p } = t;

/** base (4 MiB of 0x11) <- top, and apart.qcow2; opened as nodes base, top and apart. */
async function open(): Promise<void> {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('base.qcow2'), '4M']);
  sh('qemu-io', ['-c', 'write -P 0x11 0 4M', p('base.qcow2')]);
  sh('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-b',
    'base.qcow2',
    '-F',
    'qcow2',
    p('top.qcow2'),
  ]);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('apart.qcow2'), '4M']);
  for (const [name, backing] of [
    ['base', null],
    ['top', 'base'],
    ['apart', null],
  ] as const) {
    await t.graph.add({
      driver: 'qcow2',
      'node-name': name,
      ...(backing !== null && { backing }),
      file: { driver: 'file', 'node-name': `${name}-file`, filename: p(`${name}.qcow2`) },
    });
  }
}

/** Waits, turn by turn, until the job's body waits (a sleep or a pause point). */
async function asleep(job: Job): Promise<void> {
  while (job.busy) await new Promise((resolve) => setImmediate(resolve));
}

const reopenOf = (name: string) => ({
  driver: 'qcow2',
  'node-name': name,
  file: `${name}-file`,
  ...(name === 'top' && { backing: 'base' }),
});

describe('block jobs over drained nodes', () => {
  it('a rate-limited stream pauses and resumes around a reopen of its nodes, not of others', async () => {
    await open();
    const jobs = new JobRegistry();
    const bj = await blockStream(t.graph, jobs, { jobId: 's', device: 'top', speed: 1 });
    await new Promise((resolve) => setImmediate(resolve));
    const statuses: string[] = [];
    const off = jobs.onStatusChange((e) => statuses.push(e.data.status));
    for (const node of ['top', 'top-file', 'base', 'apart']) {
      // Each reopen finds the job asleep after its chunk (as a QMP client's next command
      // does; one sent at once would find it between its resume and its next I/O).
      await asleep(bj.job);
      const from = statuses.length;
      const options = node.endsWith('-file')
        ? { driver: 'file', 'node-name': node, filename: p('top.qcow2') }
        : reopenOf(node);
      // The events come before the reopen resolves (QEMU: before the QMP reply).
      await t.graph.reopenMultiple([options]).then(() => statuses.push('done'));
      expect([node, statuses.slice(from)]).toEqual([
        node,
        node === 'apart' ? ['done'] : ['paused', 'running', 'done'],
      ]);
      expect(bj.job.status).toBe('running');
    }
    off();
    bj.job.cancel(true);
    await bj.job.wait().catch(() => {});
  });

  it('a t.graph change without drained nodes leaves jobs alone', async () => {
    await open();
    const jobs = new JobRegistry();
    const bj = await blockStream(t.graph, jobs, { jobId: 's', device: 'top', speed: 1 });
    const statuses: string[] = [];
    const off = jobs.onStatusChange((e) => statuses.push(e.data.status));
    await t.graph.lock.write(() => {});
    await new Promise((resolve) => setImmediate(resolve));
    expect(statuses).toEqual([]);
    off();
    bj.job.cancel(true);
    await bj.job.wait().catch(() => {});
  });
});
