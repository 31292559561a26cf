// blockdev-create as an ao job: a file, then a qcow2 image on a node of it, checked by
// qemu-img; bad options refused before any job exists; the status sequence is the one
// qemu-storage-daemon reports for the same job.
import { execFileSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { JobRegistry, type JobStatusChangeEvent } from '@vmdisk/ao';
import { describe, expect, it } from 'vitest';
import { BlockOptionError, blockdevCreate } from '../src/index.ts';
import { graphPerTest } from './helpers.ts';

const t = graphPerTest('vmdisk-create-job-');

function registry(): { jobs: JobRegistry; statuses: string[] } {
  const statuses: string[] = [];
  const jobs = new JobRegistry({
    events: { push: (e: JobStatusChangeEvent) => statuses.push(`${e.data.id}:${e.data.status}`) },
  });
  return { jobs, statuses };
}

describe('blockdev-create job', () => {
  it('creates a file, then formats qcow2 on its node; qemu-img finds it clean with the options given', async () => {
    const { jobs, statuses } = registry();
    const path = join(t.dir, 'disk.qcow2');
    await blockdevCreate(t.graph, jobs, 'c1', { driver: 'file', filename: path, size: 0 }).wait();
    expect(statSync(path).size).toBe(0);
    await t.graph.add({ driver: 'file', 'node-name': 'f0', filename: path });
    await blockdevCreate(t.graph, jobs, 'c2', {
      driver: 'qcow2',
      file: 'f0',
      size: 64 << 20,
      'cluster-size': 65536,
      'lazy-refcounts': true,
      'extended-l2': true,
    }).wait();
    // As qemu-storage-daemon: concluded, and kept until dismissed.
    expect(jobs.query().map((j) => [j.id, j.status])).toEqual([
      ['c1', 'concluded'],
      ['c2', 'concluded'],
    ]);
    jobs.get('c1').dismiss();
    jobs.get('c2').dismiss();
    await new Promise((r) => setImmediate(r));
    expect(statuses.filter((s) => s.startsWith('c1:'))).toEqual(
      ['created', 'running', 'waiting', 'pending', 'concluded', 'null'].map((s) => `c1:${s}`),
    );
    expect(jobs.query()).toEqual([]);
    await t.graph.add({ driver: 'qcow2', 'node-name': 'd0', file: 'f0' });
    const backend = await t.graph.createBackend('d0', { write: true });
    await backend.write(1 << 20, Buffer.alloc(65536, 0x42));
    await backend.close();
    await t.graph.del('d0');
    await t.graph.del('f0');
    execFileSync('qemu-img', ['check', '-f', 'qcow2', path]);
    const info = JSON.parse(
      execFileSync('qemu-img', ['info', '--output=json', path], { encoding: 'utf8' }),
    );
    expect(info['virtual-size']).toBe(64 << 20);
    expect(info['cluster-size']).toBe(65536);
    expect(info['format-specific'].data).toMatchObject({
      compat: '1.1',
      'lazy-refcounts': true,
      'extended-l2': true,
    });
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x42 1M 64k', path]);
  });

  it('preallocates a file fully with progress', async () => {
    const { jobs } = registry();
    const path = join(t.dir, 'full.raw');
    const job = blockdevCreate(t.graph, jobs, 'c1', {
      driver: 'file',
      filename: path,
      size: 3 << 20,
      preallocation: 'full',
    });
    await job.wait();
    expect(job.progressCurrent).toBe(3 << 20);
    expect(statSync(path).blocks * 512).toBeGreaterThanOrEqual(3 << 20);
  });

  it.each([
    [{ driver: 'vmdk', filename: 'x', size: 1 }, 'driver'],
    [{ driver: 'file', size: 1 }, 'filename'],
    [{ driver: 'file', filename: 'x', size: -1 }, 'size'],
    [{ driver: 'file', filename: 'x', size: 1, colour: 'red' }, 'colour'],
    [{ driver: 'qcow2', file: 'f0', size: 1, version: 'v4' }, 'version'],
  ])('refuses %j before any job exists, naming %s', (options, key) => {
    const { jobs } = registry();
    let error: unknown;
    try {
      blockdevCreate(t.graph, jobs, 'bad', options as { driver: string });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(BlockOptionError);
    expect((error as BlockOptionError).key).toBe(key);
    expect(jobs.query()).toEqual([]);
  });

  it('refuses a qcow2 on a node that does not exist', () => {
    const { jobs } = registry();
    expect(() =>
      blockdevCreate(t.graph, jobs, 'c1', { driver: 'qcow2', file: 'nope', size: 1 << 20 }),
    ).toThrow(/nope/);
    expect(jobs.query()).toEqual([]);
  });
});
