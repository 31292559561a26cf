// The connection's send queue: the replies of one turn leave in one writev, in order, and
// each reply's callback runs once its bytes are handed over.

import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { SendQueue } from '../src/send-queue.ts';

class Recorder extends Writable {
  readonly batches: Buffer[][] = [];
  override _writev(
    chunks: Array<{ chunk: Buffer }>,
    callback: (error?: Error | null) => void,
  ): void {
    this.batches.push(chunks.map((c) => c.chunk));
    setImmediate(callback);
  }
  override _write(
    chunk: Buffer,
    _enc: BufferEncoding,
    callback: (error?: Error | null) => void,
  ): void {
    this.batches.push([chunk]);
    setImmediate(callback);
  }
}

describe('SendQueue', () => {
  it('coalesces the replies of one turn into one writev, never interleaving them', async () => {
    const sink = new Recorder();
    const q = new SendQueue(sink);
    const sent: number[] = [];
    q.send([Buffer.from('a1'), Buffer.from('a2')], () => sent.push(1));
    q.send([Buffer.from('b1')], () => sent.push(2));
    q.send([Buffer.from('c1'), Buffer.from('c2'), Buffer.from('c3')], () => sent.push(3));
    expect(sink.batches).toEqual([]);
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    expect(sink.batches.map((b) => b.map(String))).toEqual([['a1', 'a2', 'b1', 'c1', 'c2', 'c3']]);
    expect(sent).toEqual([1, 2, 3]);
    // A later turn is a later batch (waited for by its callback: a timer may fire first
    // on a loaded machine).
    await new Promise<void>((resolve) =>
      q.send([Buffer.from('d1')], () => {
        sent.push(4);
        resolve();
      }),
    );
    expect(sink.batches.map((b) => b.map(String))).toEqual([
      ['a1', 'a2', 'b1', 'c1', 'c2', 'c3'],
      ['d1'],
    ]);
    expect(sent).toEqual([1, 2, 3, 4]);
  });

  it('still calls back when the socket is gone', async () => {
    const sink = new Recorder();
    const q = new SendQueue(sink);
    sink.destroy();
    let called = false;
    q.send([Buffer.from('x')], () => {
      called = true;
    });
    await new Promise((r) => setImmediate(r));
    expect(called).toBe(true);
  });
});
