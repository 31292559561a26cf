// Engine choice and lifecycle, in child processes where the process itself is what is
// observed (does it exit by itself? what does VMDISK_ENGINE pick? what happens when the
// kernel refuses io_uring and Linux AIO?).
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type EngineError, openEngine, sharedEngine } from '../src/index.ts';
import { BACKENDS, tempDir } from './helpers.ts';

const INDEX = pathToFileURL(fileURLToPath(new URL('../src/index.ts', import.meta.url))).href;
let tmp: ReturnType<typeof tempDir>;
beforeAll(() => {
  tmp = tempDir();
});
afterAll(() => tmp.cleanup());

interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs an ES module script in a child Node; kills it if it has not exited in 20 s (a
 * liveness bound, not a timing assertion). */
function runChild(script: string, env: Record<string, string> = {}): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
      // No colours in the child's console.log, whatever the runner set (nx sets FORCE_COLOR).
      env: { ...process.env, FORCE_COLOR: '0', NO_COLOR: '1', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
    });
    child.stderr.on('data', (d) => {
      stderr += d;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** A child script that installs a seccomp filter making io_uring_setup (425) and io_setup
 * (206) fail with ENOSYS on its main thread, as on a kernel without them. */
const DENY_IO_URING_AND_AIO = `
import koffi from 'koffi';
const libc = koffi.load('libc.so.6');
const prctl = libc.func('int prctl(int, unsigned long, void *, unsigned long, unsigned long)');
const prog = new Uint8Array(8 * 5);
const dv = new DataView(prog.buffer);
const ins = (i, code, jt, jf, k) => { dv.setUint16(i * 8, code, true); prog[i * 8 + 2] = jt; prog[i * 8 + 3] = jf; dv.setUint32(i * 8 + 4, k, true); };
ins(0, 0x20, 0, 0, 0);          // ld [nr]
ins(1, 0x15, 2, 0, 425);        // jeq io_uring_setup -> deny
ins(2, 0x15, 1, 0, 206);        // jeq io_setup -> deny
ins(3, 0x06, 0, 0, 0x7fff0000); // ret ALLOW
ins(4, 0x06, 0, 0, 0x00050000 | 38); // ret ERRNO(ENOSYS)
const fprog = new BigUint64Array(2);
fprog[0] = 5n;
fprog[1] = koffi.address(prog);
if (prctl(38, 1, null, 0, 0) !== 0) throw new Error('PR_SET_NO_NEW_PRIVS failed');
if (prctl(22, 2, fprog, 0, 0) !== 0) throw new Error('PR_SET_SECCOMP failed ' + koffi.errno());
`;

describe('choosing a backend', () => {
  it('VMDISK_ENGINE forces each backend for auto', async () => {
    for (const backend of BACKENDS) {
      const r = await runChild(
        `import { openEngine, sharedEngine } from '${INDEX}';
         const e = await openEngine();
         const s = await sharedEngine();
         console.log(e.backend, s.backend);
         await e.close(); await s.close();`,
        { VMDISK_ENGINE: backend },
      );
      expect(r.stderr).toBe('');
      expect(r.stdout.trim()).toBe(`${backend} ${backend}`);
      expect(r.code).toBe(0);
    }
  });

  it('auto picks io_uring on this kernel; an explicit backend wins over VMDISK_ENGINE', async () => {
    const r = await runChild(
      `import { openEngine } from '${INDEX}';
       const a = await openEngine();
       const t = await openEngine({ backend: 'threadpool' });
       console.log(a.backend, t.backend);
       await a.close(); await t.close();`,
      { VMDISK_ENGINE: '' },
    );
    expect(r.stdout.trim()).toBe('io_uring threadpool');
    expect(r.code).toBe(0);
  });

  it('an unknown backend name is refused with a clear error', async () => {
    const err = (await openEngine({ backend: 'spdk' as 'aio' }).catch(
      (e: unknown) => e,
    )) as EngineError;
    expect(err.code).toBe('ERR_VMDISK_ENGINE_INVALID_ARGUMENT');
    expect(err.message).toMatch(/spdk/);
    const r = await runChild(
      `import { openEngine } from '${INDEX}';
       try { await openEngine(); } catch (e) { console.log(e.code); }`,
      { VMDISK_ENGINE: 'uring' },
    );
    expect(r.stdout.trim()).toBe('ERR_VMDISK_ENGINE_INVALID_ARGUMENT');
  });

  it('a forced backend the kernel refuses fails clearly; auto falls back to threadpool', async () => {
    const path = tmp.file('fallback.img');
    writeFileSync(path, Buffer.alloc(8192, 5));
    const r = await runChild(
      `${DENY_IO_URING_AND_AIO}
       const { openEngine } = await import('${INDEX}');
       for (const backend of ['io_uring', 'aio']) {
         try { await openEngine({ backend }); console.log(backend, 'opened?'); }
         catch (e) { console.log(backend, e.code, e.cause?.errnoName); }
       }
       const e = await openEngine();
       const f = await e.openFile(${JSON.stringify(path)});
       const b = Buffer.alloc(8192);
       console.log(e.backend, await f.read(b, 0), b.every((x) => x === 5));
       await e.close();`,
      { VMDISK_ENGINE: '' },
    );
    expect(r.stderr).toBe('');
    expect(r.stdout.trim().split('\n')).toEqual([
      'io_uring ERR_VMDISK_ENGINE_BACKEND_UNAVAILABLE ENOSYS',
      'aio ERR_VMDISK_ENGINE_BACKEND_UNAVAILABLE ENOSYS',
      'threadpool 8192 true',
    ]);
  });

  it('sharedEngine gives this thread one engine per backend, and a new one once closed', async () => {
    const a = await sharedEngine('threadpool');
    const b = await sharedEngine('threadpool');
    expect(a).toBe(b);
    const u = await sharedEngine('io_uring');
    expect(u).not.toBe(a);
    expect(u.backend).toBe('io_uring');
    await a.close();
    const c = await sharedEngine('threadpool');
    expect(c).not.toBe(a);
    expect(c.backend).toBe('threadpool');
    await c.close();
    await u.close();
  });
  it("'auto' and the backend it picks are one shared engine, whichever is asked first", async () => {
    // A buffer from one must be a registered buffer of the other (see sharedEngine).
    const r = await runChild(
      `import { sharedEngine } from '${INDEX}';
       const named = await sharedEngine('io_uring');
       const auto = await sharedEngine('auto');
       const [a, b] = await Promise.all([sharedEngine('auto'), sharedEngine('io_uring')]);
       console.log(auto === named, a === named, b === named);
       await named.close();
       const [c, d] = await Promise.all([sharedEngine('auto'), sharedEngine('io_uring')]);
       console.log(c !== named, c === d, c.backend);
       await c.close();`,
      { VMDISK_ENGINE: '' },
    );
    expect(r.stderr).toBe('');
    expect(r.stdout.trim().split('\n')).toEqual(['true true true', 'true true io_uring']);
  });
});

describe('one engine per JS thread', () => {
  it('a worker thread gets its own shared engine, and closing it leaves this one working', async () => {
    const path = tmp.file('worker.img');
    writeFileSync(path, Buffer.alloc(8192, 0x5a));
    const mine = await sharedEngine('io_uring');
    const code = `
      import { parentPort } from 'node:worker_threads';
      import { sharedEngine } from '${INDEX}';
      const e = await sharedEngine('io_uring');
      const again = await sharedEngine('io_uring');
      const f = await e.openFile(${JSON.stringify(path)}, { direct: true });
      const b = e.allocBuffer(8192);
      const n = await f.read(b, 0);
      await e.close();
      parentPort.postMessage({ backend: e.backend, same: e === again, n, ok: b.every((x) => x === 0x5a) });`;
    const msg = await new Promise((resolve, reject) => {
      const w = new Worker(code, { eval: true });
      w.once('message', resolve);
      w.once('error', reject);
    });
    expect(msg).toEqual({ backend: 'io_uring', same: true, n: 8192, ok: true });
    const f = await mine.openFile(path, { readOnly: true });
    const b = Buffer.alloc(100);
    expect(await f.read(b, 8000)).toBe(100);
    expect(b.every((x) => x === 0x5a)).toBe(true);
    expect(await sharedEngine('io_uring')).toBe(mine);
    await mine.close();
  });
});

describe.each(BACKENDS)('%s: a process using an engine', (backend) => {
  it('exits by itself after closing its engine, even with I/O in flight at close()', async () => {
    const path = tmp.file(`child-${backend}.img`);
    const r = await runChild(
      `import { openEngine } from '${INDEX}';
       const e = await openEngine({ backend: '${backend}' });
       const f = await e.openFile(${JSON.stringify(path)}, { create: true });
       const d = await e.openFile(${JSON.stringify(path)}, { direct: true });
       const buf = e.allocBuffer(65536).fill(3);
       const io = [];
       for (let i = 0; i < 100; i++) io.push(f.write(buf, i * 65536));
       await Promise.all(io);
       for (let i = 0; i < 100; i++) io.push(d.read(e.allocBuffer(4096), i * 4096), f.fsync());
       await e.close();
       const n = (await Promise.all(io)).length;
       console.log('done', n);`,
    );
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe('done 300');
    expect(r.signal).toBeNull();
    expect(r.code).toBe(0);
  });

  it('exits by itself with an idle engine left open (nothing in flight keeps it alive)', async () => {
    const path = tmp.file(`idle-${backend}.img`);
    writeFileSync(path, Buffer.alloc(4096, 9));
    // Eight times, one after the other: a completion poller left running at exit aborted
    // about one exit in six (koffi calling into JavaScript while the environment tears down).
    const runs = [];
    for (let i = 0; i < 8; i++) {
      runs.push(
        await runChild(
          `import { openEngine } from '${INDEX}';
           const e = await openEngine({ backend: '${backend}' });
           const f = await e.openFile(${JSON.stringify(path)}, { direct: true });
           const b = e.allocBuffer(4096);
           console.log(await f.read(b, 0), b[0]);`,
        ),
      );
    }
    for (const r of runs) {
      expect(r.stdout.trim()).toBe('4096 9');
      expect(r.signal).toBeNull();
      expect(r.code).toBe(0);
    }
  });

  it('stays alive while I/O is in flight even with nothing else to do', async () => {
    const path = tmp.file(`alive-${backend}.img`);
    writeFileSync(path, Buffer.alloc(1024 * 1024, 4));
    // No await at top level keeps the loop alive: only the engine's waiter does.
    const r = await runChild(
      `import { openEngine } from '${INDEX}';
       openEngine({ backend: '${backend}' }).then(async (e) => {
         const f = await e.openFile(${JSON.stringify(path)}, { direct: true });
         let done = 0;
         for (let i = 0; i < 256; i++) {
           const b = e.allocBuffer(4096);
           f.read(b, i * 4096).then((n) => { if (n === 4096 && b[0] === 4) done++; });
         }
         process.on('exit', () => console.log('reads', done));
       });`,
    );
    expect(r.stdout.trim()).toBe('reads 256');
    expect(r.code).toBe(0);
  });
});
