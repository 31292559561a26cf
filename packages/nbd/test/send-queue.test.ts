// The connection's send queue: the replies of one turn leave in one writev, in order, and
// each reply's callback runs once its bytes are handed over; with a FileSender's sendv,
// that writev is a direct send, and what it does not take goes through the socket.

import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { type FileSender, SendQueue } from '../src/send-queue.ts';

class Recorder extends Writable {
  readonly batches: Buffer[][] = [];
  /** Keeps a copy of each chunk: its buffer is the writer's again after the callback. */
  private readonly copies: boolean;
  constructor(copies = false) {
    super();
    this.copies = copies;
  }
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
    this.batches.push([this.copies ? Buffer.from(chunk) : chunk]);
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

  describe('sending directly (FileSender.sendv)', () => {
    /** A sender whose sendmsg takes `room()` bytes a call, recorded in `taken`. */
    const direct = (room: () => number) => {
      const taken: string[] = [];
      const sender: FileSender = {
        send: () => -38,
        sendFile: () => -38,
        read: () => -38,
        sendv: (_fd, bufs) => {
          const all = Buffer.concat(bufs).subarray(0, room());
          if (all.byteLength === 0) return -11;
          taken.push(String(all));
          return all.byteLength;
        },
      };
      return { taken, sender };
    };
    const turn = () => new Promise((r) => setImmediate(r));

    it('sends the turn in one call and calls back in order', async () => {
      const sink = new Recorder();
      const { taken, sender } = direct(() => 1000);
      const q = new SendQueue(sink, { sockFd: 3, sender });
      const sent: number[] = [];
      q.send([Buffer.from('a1'), Buffer.from('a2')], () => sent.push(1));
      q.send([Buffer.from('b1')], () => sent.push(2));
      expect(taken).toEqual([]);
      await turn();
      expect(taken).toEqual(['a1a2b1']);
      expect(sent).toEqual([1, 2]);
      expect(sink.batches).toEqual([]);
    });

    it('writes what was not taken through the socket, a callback once its reply is out', async () => {
      const sink = new Recorder();
      const { taken, sender } = direct(() => 3);
      const q = new SendQueue(sink, { sockFd: 3, sender });
      const sent: number[] = [];
      // The first reply's callback queues another: it goes after everything before it.
      q.send([Buffer.from('a1'), Buffer.from('a2')], () => {
        sent.push(1);
        q.send([Buffer.from('d1')], () => sent.push(4));
      });
      q.send([Buffer.from('b1')], () => sent.push(2));
      q.send([Buffer.from('c1')], () => sent.push(3));
      await turn();
      expect(taken).toEqual(['a1a']);
      while (sent.length < 4) await turn();
      // The rest went through the socket, in order; 'd1' went after it, directly again.
      expect(sink.batches.map((b) => b.map(String))).toEqual([['2', 'b1', 'c1']]);
      expect(taken).toEqual(['a1a', 'd1']);
      expect(sent).toEqual([1, 2, 3, 4]);
    });

    it('calls back at once the replies it sent whole', async () => {
      const sink = new Recorder();
      const { taken, sender } = direct(() => 4);
      const q = new SendQueue(sink, { sockFd: 3, sender });
      const sent: number[] = [];
      q.send([Buffer.from('a1'), Buffer.from('a2')], () => sent.push(1));
      q.send([Buffer.from('b1')], () => sent.push(2));
      await turn();
      expect(taken).toEqual(['a1a2']);
      expect(sent).toEqual([1]);
      await turn();
      await turn();
      expect(sink.batches.map((b) => b.map(String))).toEqual([['b1']]);
      expect(sent).toEqual([1, 2]);
    });
  });
});

describe('SendQueue on a socket that copies a writev (TLS)', () => {
  it('hands over one buffer at a time: large ones alone, small ones merged, in order', async () => {
    const sink = new Recorder(true);
    const q = new SendQueue(sink, undefined, true);
    const big = (fill: number) => Buffer.alloc(256 * 1024, fill);
    const replies: Buffer[][] = [
      [Buffer.from('h1'), big(1)],
      [Buffer.from('h2')],
      [Buffer.from('h3'), Buffer.alloc(40 * 1024, 3)],
      [Buffer.from('h4'), Buffer.alloc(40 * 1024, 4)],
      [Buffer.from('h5'), big(5)],
    ];
    const sent: number[] = [];
    const all = new Promise<void>((resolve) => {
      for (const [i, r] of replies.entries()) {
        q.send(r, () => {
          sent.push(i + 1);
          if (i === replies.length - 1) resolve();
        });
      }
    });
    await all;
    // Never a writev: one chunk per write, the next written once the previous is done.
    expect(sink.batches.every((b) => b.length === 1)).toBe(true);
    const chunks = sink.batches.map((b) => b[0]!);
    // h1 | its data | h2 h3 h3's data h4 | h4's data h5 | h5's data: merged chunks stay
    // within 64 KiB (h3's and h4's data do not fit together).
    expect(chunks.map((c) => c.length)).toEqual([
      2,
      256 * 1024,
      2 + 2 + 40 * 1024 + 2,
      40 * 1024 + 2,
      256 * 1024,
    ]);
    expect(Buffer.concat(chunks).equals(Buffer.concat(replies.flat()))).toBe(true);
    expect(sent).toEqual([1, 2, 3, 4, 5]);
  });

  it('calls back a reply of no buffers in its turn', async () => {
    const sink = new Recorder(true);
    const q = new SendQueue(sink, undefined, true);
    const sent: number[] = [];
    await new Promise<void>((resolve) => {
      q.send([Buffer.from('a')], () => sent.push(1));
      q.send([], () => sent.push(2));
      q.send([Buffer.from('b')], () => {
        sent.push(3);
        resolve();
      });
    });
    expect(sent).toEqual([1, 2, 3]);
    expect(Buffer.concat(sink.batches.flat()).toString()).toBe('ab');
  });

  it('still calls back when the socket is gone', async () => {
    const sink = new Recorder();
    const q = new SendQueue(sink, undefined, true);
    const sent: number[] = [];
    const done = new Promise<void>((resolve) => {
      q.send([Buffer.from('a'), Buffer.alloc(128 * 1024)], () => sent.push(1));
      q.send([Buffer.from('b')], () => {
        sent.push(2);
        resolve();
      });
    });
    sink.destroy();
    await done;
    expect(sent).toEqual([1, 2]);
  });
});
