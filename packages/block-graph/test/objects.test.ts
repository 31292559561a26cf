// The object registry (QEMU's /objects): throttle-group (limits, or x-KEY one by one as the
// command line gives them), secret (data or file, raw or base64), tls-creds-*; checked with
// the option helpers in either syntax, with QEMU's words; an object in use stays.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/graph.ts';
import { checkObjectOptions, ObjectRegistry, type Secret } from '../src/objects.ts';

const dir = mkdtempSync(join(tmpdir(), 'vmdisk-objects-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const message = (f: () => unknown) => {
  try {
    f();
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error('no error');
};

describe('object registry', () => {
  it('throttle-group: x-KEY properties (keyval strings or JSON integers) and limits', async () => {
    const g = new BlockGraph();
    await g.addObject(
      { 'qom-type': 'throttle-group', id: 't0', 'x-iops-total': '50', 'x-iops-total-max': '60' },
      { syntax: 'keyval' },
    );
    await g.addObject({ 'qom-type': 'throttle-group', id: 't1', limits: { 'bps-read': 4096 } });
    await g.add({ driver: 'null-co', 'node-name': 'n', size: 1 << 20 });
    await g.add({ driver: 'throttle', 'node-name': 'a', 'throttle-group': 't0', file: 'n' });
    expect(g.query().find((n) => n['node-name'] === 'a')).toMatchObject({
      'throttle-group': 't0',
      limits: { 'iops-total': 50, 'iops-total-max': 60 },
    });
    await expect(
      g.add({ driver: 'throttle', 'node-name': 'b', 'throttle-group': 'zz', file: 'n' }),
    ).rejects.toMatchObject({
      key: 'throttle-group',
      message: "Throttle group 'zz' does not exist",
    });
    const r = new ObjectRegistry();
    const add = (o: Record<string, unknown>, syntax: 'json' | 'keyval' = 'json') =>
      message(() => r.add({ 'qom-type': 'throttle-group', id: 'x', ...o }, syntax));
    expect(add({ 'x-iops-total': 'abc' }, 'keyval')).toBe(
      "Parameter 'x-iops-total' expects integer",
    );
    expect(add({ 'x-iops-total': '5' })).toBe(
      "Invalid parameter type for 'x-iops-total', expected: integer",
    );
    expect(add({ bogus: 1 })).toBe("Parameter 'bogus' is unexpected");
    expect(add({ 'x-bogus': 1 })).toBe("Parameter 'x-bogus' is unexpected");
    await g.close();
  });

  it('iothread: its settings with QEMU 7.2 defaults and words; refused while in use', () => {
    const r = new ObjectRegistry();
    r.add({ 'qom-type': 'iothread', id: 'io0' });
    r.add({ 'qom-type': 'iothread', id: 'io1', 'poll-max-ns': '0' }, 'keyval');
    expect(r.get('iothread', 'io0', 'iothread')).toEqual({
      pollMaxNs: 32768,
      pollGrow: 0,
      pollShrink: 0,
      aioMaxBatch: 0,
      threadPoolMin: 0,
      threadPoolMax: 64,
    });
    expect(r.get('iothread', 'io1', 'iothread').pollMaxNs).toBe(0);
    const add = (o: Record<string, unknown>) =>
      message(() => r.add({ 'qom-type': 'iothread', id: 'x', ...o }));
    expect(add({ 'poll-max-ns': -1 })).toBe(
      'poll-max-ns value must be in range [0, 9223372036854775807]',
    );
    expect(add({ 'thread-pool-min': 5, 'thread-pool-max': 2 })).toBe(
      'bad thread-pool-min/thread-pool-max values',
    );
    expect(add({ bogus: 1 })).toBe("Parameter 'bogus' is unexpected");
    r.setProperty('io0', 'poll-max-ns', 5);
    expect(r.get('iothread', 'io0', 'iothread').pollMaxNs).toBe(5);
    r.use('iothread', 'io0', 'iothread');
    expect(message(() => r.del('io0'))).toBe("object 'io0' is in use, can not be deleted");
    r.release('io0');
    r.del('io0');
  });

  it('secret: data or file, raw or base64, in QEMU words when wrong', () => {
    const r = new ObjectRegistry();
    const file = join(dir, 'key');
    writeFileSync(file, Buffer.from([0, 1, 2, 255]));
    const b64 = join(dir, 'key.b64');
    writeFileSync(b64, 'aGVsbG8=\n');
    r.add({ 'qom-type': 'secret', id: 's0', data: 'abc' }, 'keyval');
    r.add({ 'qom-type': 'secret', id: 's1', data: 'aGVsbG8=', format: 'base64' });
    r.add({ 'qom-type': 'secret', id: 's2', file });
    r.add({ 'qom-type': 'secret', id: 's3', file: b64, format: 'base64' });
    const data = (id: string) => (r.get('secret', id, 'key-secret') as Secret).data;
    expect(data('s0').toString()).toBe('abc');
    expect(data('s1').toString()).toBe('hello');
    expect([...data('s2')]).toEqual([0, 1, 2, 255]);
    expect(data('s3').toString()).toBe('hello');
    const add = (o: Record<string, unknown>) =>
      message(() => r.add({ 'qom-type': 'secret', id: 'x', ...o }));
    expect(add({})).toBe("Either 'file' or 'data' must be provided");
    expect(add({ data: 'a', file })).toBe("'file' and 'data' are mutually exclusive");
    expect(add({ data: '!!', format: 'base64' })).toBe('Base64 data contains invalid characters');
    expect(add({ data: 'a', format: 'hex' })).toBe(
      "Parameter 'format' does not accept value 'hex'",
    );
    expect(add({ file: join(dir, 'none') })).toBe(
      `Unable to read ${join(dir, 'none')}: No such file or directory`,
    );
    expect(add({ data: 'a', keyid: 's0' })).toMatch(/keyid.*not supported/);
    expect(r.list().map((o) => [o.id, o['qom-type']])).toEqual([
      ['s0', 'secret'],
      ['s1', 'secret'],
      ['s2', 'secret'],
      ['s3', 'secret'],
    ]);
  });

  it('checks qom-type and id as QEMU does; duplicate, missing and in-use objects', () => {
    const check = (o: Record<string, unknown>) => message(() => checkObjectOptions(o));
    expect(check({ id: 'a' })).toBe("Parameter 'qom-type' is missing");
    expect(check({ 'qom-type': 'secret' })).toBe("Parameter 'id' is missing");
    expect(check({ 'qom-type': 'nosuch', id: 'a' })).toBe(
      "Parameter 'qom-type' does not accept value 'nosuch'",
    );
    expect(check({ 'qom-type': 'secret', id: '9a', data: 'x' })).toBe(
      "Parameter 'id' expects an identifier",
    );
    // tls-creds-psk needs its key file at once (QEMU reads the directory on creation).
    expect(
      message(() =>
        new ObjectRegistry().add({ 'qom-type': 'tls-creds-psk', id: 'p', dir, endpoint: 'client' }),
      ),
    ).toBe(`Unable to access credentials ${join(dir, 'keys.psk')}: No such file or directory`);
    const r = new ObjectRegistry();
    r.add({ 'qom-type': 'secret', id: 's', data: 'x' });
    expect(message(() => r.add({ 'qom-type': 'secret', id: 's', data: 'y' }))).toBe(
      "attempt to add duplicate property 's' to object (type 'container')",
    );
    r.use('secret', 's', 'key');
    expect(message(() => r.del('s'))).toBe("object 's' is in use, can not be deleted");
    r.release('s');
    r.del('s');
    expect(message(() => r.del('s'))).toBe("object 's' not found");
    // get() reads without taking the object into use.
    r.add({ 'qom-type': 'secret', id: 't', data: 'x' });
    r.get('secret', 't', 'key');
    r.del('t');
  });
});
