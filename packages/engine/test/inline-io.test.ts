// Which buffered requests that would block in io_uring (tmpfs) are done inline with
// pread/pwrite: up to 16 KiB where the process has more than one CPU, up to 128 KiB where its
// affinity leaves it one (a pinned daemon: io-wq could never copy beside the event loop).
// Each case in a process of its own, its affinity set by taskset.
import { execFileSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { describe, expect, it } from 'vitest';
import { tempDir } from './helpers.ts';

const index = new URL('../src/index.ts', import.meta.url).pathname;

/** In a child on `cpus`: reads of each size from a tmpfs file; how each was done. */
function reads(cpus: string, sizes: number[]): { inline: number; async: number }[] {
  const tmp = tempDir('/dev/shm');
  try {
    const path = tmp.file('r.img');
    const script = `
      import { writeFileSync } from 'node:fs';
      const { openEngine } = await import(${JSON.stringify(index)});
      writeFileSync(${JSON.stringify(path)}, Buffer.alloc(2 << 20, 7));
      const engine = await openEngine({ backend: 'io_uring' });
      const be = engine.be;
      const f = await engine.openFile(${JSON.stringify(path)});
      const out = [];
      for (const size of ${JSON.stringify(sizes)}) {
        const i0 = be.inlineIos, a0 = be.asyncIos;
        const buf = Buffer.alloc(size);
        if ((await f.read(buf, 0)) !== size || buf[size - 1] !== 7) throw new Error('bad read');
        out.push({ inline: be.inlineIos - i0, async: be.asyncIos - a0 });
      }
      await f.close();
      await engine.close();
      console.log(JSON.stringify(out));`;
    const env = { ...process.env };
    delete env.VMDISK_ENGINE_INLINE_MAX;
    const out = execFileSync(
      'taskset',
      ['-c', cpus, process.execPath, '--input-type=module', '-e', script],
      { encoding: 'utf8', env },
    );
    return JSON.parse(out) as { inline: number; async: number }[];
  } finally {
    tmp.cleanup();
  }
}

const INLINE = { inline: 1, async: 0 };
const IO_WQ = { inline: 0, async: 1 };

describe('inline requests by the CPUs the process may use', () => {
  it('one CPU: up to 128 KiB inline, larger ones on io-wq', () => {
    expect(reads('0', [4096, 64 << 10, 128 << 10, 256 << 10])).toEqual([
      INLINE,
      INLINE,
      INLINE,
      IO_WQ,
    ]);
  });

  it('more than one CPU: up to 16 KiB inline', () => {
    expect(availableParallelism()).toBeGreaterThan(1);
    expect(reads('0,1', [4096, 16 << 10, 256 << 10])).toEqual([INLINE, INLINE, IO_WQ]);
  });
});
