// One send queue per connection. A reply is a list of buffers handed over in one call, so
// replies never interleave; everything queued in one turn of the event loop leaves in
// one writev, once the turn's I/O callbacks have run. Given a FileSender with `sendv`, that
// writev is a sendmsg(2) on the socket's descriptor, and only what the socket does not
// take goes through the socket's write (Node's stream machinery costs more than the
// system call for a small reply); without one, the socket is corked for the turn, except
// a TLS socket, written one buffer at a time (copiesWritev: Node would copy a writev). A reply
// streamed in pieces holds the queue: the other replies wait behind it, so that it stays
// contiguous on the wire. A READ whose data are a file's cached bytes
// (ExportTarget.fileRange) may go out from the file itself, written to the socket's
// descriptor at once when nothing queued is waiting before it.

import type { Writable } from 'node:stream';

/**
 * What writes to a socket's descriptor directly, a file's bytes included (vm-disk passes
 * @vmdisk/engine's): each call runs on this thread, never waits, and returns the bytes
 * done or a negative errno.
 */
export interface FileSender {
  /** send(2) without waiting (MSG_DONTWAIT): the bytes the socket took. */
  send(sockFd: number, buf: Uint8Array): number;
  /**
   * sendmsg(2) of the buffers in order without waiting: the bytes the socket took (it may
   * stop inside a buffer, or before the last if it takes only so many). Optional: without
   * it, replies go through the socket's write.
   */
  sendv?(sockFd: number, bufs: readonly Uint8Array[]): number;
  /** sendfile(2) to the non-blocking socket: the bytes the socket took. */
  sendFile(sockFd: number, fileFd: number, offset: number, length: number): number;
  /** pread(2): the bytes read (what the socket did not take is read and queued). */
  read(fd: number, buf: Uint8Array, offset: number): number;
}

type Reply = readonly [readonly Uint8Array[], (() => void) | undefined];

/** One write at a time (copiesWritev): a buffer this large goes alone... */
const ALONE_BYTES = 64 * 1024;
/** ...smaller ones are merged into one of at most this many bytes. */
const MERGE_BYTES = 64 * 1024;
const NOTHING = new Uint8Array(0);

export class SendQueue {
  private readonly socket: Writable;
  private corked = false;
  private held = false;
  private readonly waiting: Reply[] = [];
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  /** Where file bytes may be sent (plain sockets of a server given a FileSender). */
  private readonly files: { sockFd: number; sender: FileSender } | undefined;
  /** This turn's replies are sent by the FileSender's sendv. */
  private readonly direct: boolean;
  /** This turn's buffers, in order (direct sending). */
  private out: Uint8Array[] = [];
  /** The replies' callbacks, and after which buffer of `out` each is due. */
  private outSent: (() => void)[] = [];
  private outEnds: number[] = [];
  private flushScheduled = false;
  private readonly flush = (): void => {
    this.flushScheduled = false;
    this.flushOut();
  };

  /**
   * The socket copies the buffers of a writev into one new allocation first (a TLS socket:
   * Node's TLSWrap encrypts from one buffer), and Node's Writable makes a writev of all it
   * holds behind a write in progress. So replies go one write at a time, the next when
   * the previous one's callback runs: a buffer of ALONE_BYTES or more alone, smaller ones
   * merged into a buffer of our own, reused. (A 1 MiB READ over TLS cost 1.5 ms of CPU,
   * a third of it Node's copy into a fresh mapping and its page faults.)
   */
  private readonly oneAtATime: boolean;
  private readonly serial: Reply[] = [];
  /** The buffers of serial[0] already written. */
  private serialAt = 0;
  private serialWriting = false;
  private merge: Buffer | undefined;

  constructor(
    socket: Writable,
    files?: { sockFd: number; sender: FileSender },
    copiesWritev = false,
  ) {
    this.socket = socket;
    this.files = files;
    this.direct = files?.sender.sendv !== undefined;
    this.oneAtATime = copiesWritev && !this.direct;
  }

  /** Replies may take their data from files (sendFile). */
  get sendsFiles(): boolean {
    return this.files !== undefined;
  }

  /**
   * Sends `header`, then `length` bytes of file `fd` at `offset`, straight to the socket
   * if nothing is waiting before them (nothing held, nothing in the socket's buffer).
   * Returns how many of these bytes went out (all, some, or 0): the caller sends the rest
   * with send(), at once.
   */
  sendFile(header: Uint8Array, fd: number, offset: number, length: number): number {
    const f = this.files;
    const socket = this.socket;
    if (f === undefined || this.held || socket.destroyed) return 0;
    // What this turn queued goes first (the socket writes it now if it can).
    if (this.corked) this.uncork();
    this.flushOut();
    if (this.out.length > 0 || socket.writableLength > 0) return 0;
    const h = f.sender.send(f.sockFd, header);
    if (h < header.byteLength) return Math.max(h, 0);
    let done = 0;
    while (done < length) {
      const n = f.sender.sendFile(f.sockFd, fd, offset + done, length - done);
      if (n <= 0) break;
      done += n;
    }
    return h + done;
  }

  /** pread through the FileSender (sendFile's caller reading what did not go out). */
  readFile(fd: number, buf: Uint8Array, offset: number): number {
    return this.files!.sender.read(fd, buf, offset);
  }

  /**
   * Queues one reply. `sent` runs once its bytes have been handed to the kernel, or the
   * socket is gone (its buffers may then be reused).
   */
  send(buffers: readonly Uint8Array[], sent?: () => void): void {
    if (this.held) this.waiting.push([buffers, sent]);
    else this.write(buffers, sent);
  }

  /** Until release(), only sendHeld() goes out; send() waits. */
  hold(): void {
    this.held = true;
  }

  /** A part of the reply that holds the queue. */
  sendHeld(buffers: readonly Uint8Array[], sent?: () => void): void {
    this.write(buffers, sent);
  }

  /** The held reply is complete: what waited goes out, in order. */
  release(): void {
    this.held = false;
    for (const [buffers, sent] of this.waiting.splice(0)) this.write(buffers, sent);
  }

  private write(buffers: readonly Uint8Array[], sent: (() => void) | undefined): void {
    const socket = this.socket;
    if (socket.destroyed || socket.writableEnded) {
      if (sent) queueMicrotask(sent);
      return;
    }
    if (this.direct) {
      for (const b of buffers) this.out.push(b);
      if (sent) {
        this.outSent.push(sent);
        this.outEnds.push(this.out.length);
      }
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        setImmediate(this.flush);
      }
      return;
    }
    if (this.oneAtATime) {
      // (A reply of no buffers is one empty buffer: it keeps its place for its callback.)
      this.serial.push([buffers.length > 0 ? buffers : [NOTHING], sent]);
      if (!this.flushScheduled && !this.serialWriting) {
        this.flushScheduled = true;
        setImmediate(this.writeNext);
      }
      return;
    }
    if (!this.corked) {
      this.corked = true;
      socket.cork();
      setImmediate(this.uncork);
    }
    const last = buffers.length - 1;
    for (let i = 0; i < last; i++) socket.write(buffers[i]!);
    if (sent) socket.write(buffers[last]!, () => sent());
    else socket.write(buffers[last]!);
  }

  /** Writes the next chunk of `serial` (oneAtATime); the next goes when it is written. */
  private readonly writeNext = (): void => {
    this.flushScheduled = false;
    const serial = this.serial;
    if (this.serialWriting || serial.length === 0) return;
    const socket = this.socket;
    if (socket.destroyed || socket.writableEnded) {
      for (const [, sent] of serial.splice(0)) if (sent) queueMicrotask(sent);
      this.serialAt = 0;
      return;
    }
    const due: (() => void)[] = [];
    const take = (): void => {
      const [buffers, sent] = serial[0]!;
      if (++this.serialAt < buffers.length) return;
      serial.shift();
      this.serialAt = 0;
      if (sent) due.push(sent);
    };
    let chunk: Uint8Array;
    const first = serial[0]![0][this.serialAt]!;
    if (first.byteLength >= ALONE_BYTES) {
      chunk = first;
      take();
    } else {
      this.merge ??= Buffer.allocUnsafe(MERGE_BYTES);
      const merge = this.merge;
      let n = 0;
      while (serial.length > 0) {
        const b = serial[0]![0][this.serialAt]!;
        if (b.byteLength >= ALONE_BYTES || n + b.byteLength > MERGE_BYTES) break;
        merge.set(b, n);
        n += b.byteLength;
        take();
      }
      chunk = merge.subarray(0, n);
    }
    this.serialWriting = true;
    socket.write(chunk, () => {
      this.serialWriting = false;
      for (const sent of due) sent();
      this.writeNext();
    });
  };

  /**
   * Sends this turn's buffers: by sendmsg while nothing waits in the socket's buffer and
   * the socket takes them, the rest through the socket's write, in order. A callback runs
   * here once its reply went out whole by sendmsg, else from the socket's write.
   */
  private flushOut(): void {
    const out = this.out;
    if (out.length === 0) return;
    // A callback may queue the next replies: they go to fresh arrays, after these.
    const sents = this.outSent;
    const ends = this.outEnds;
    this.out = [];
    this.outSent = [];
    this.outEnds = [];
    const socket = this.socket;
    const f = this.files!;
    let i = 0; // the first buffer not wholly sent
    let part = 0; // the bytes of out[i] sent
    while (i < out.length && !socket.destroyed && socket.writableLength === 0) {
      const bufs = i === 0 && part === 0 ? out : out.slice(i);
      if (part > 0) bufs[0] = out[i]!.subarray(part);
      let asked = 0;
      for (const b of bufs) asked += b.byteLength;
      let n = f.sender.sendv!(f.sockFd, bufs);
      if (n <= 0) break; // EAGAIN, or an error the socket's write reports
      const short = n < asked;
      while (i < out.length) {
        const left = out[i]!.byteLength - part;
        if (n < left) {
          part += n;
          break;
        }
        n -= left;
        part = 0;
        i++;
      }
      if (short) break;
    }
    // The replies that went out whole are called back after the rest is queued.
    let done = 0;
    while (done < ends.length && ends[done]! <= i) done++;
    if (i < out.length) {
      if (socket.destroyed || socket.writableEnded) {
        for (let k = done; k < sents.length; k++) queueMicrotask(sents[k]!);
      } else {
        socket.cork();
        let k = done;
        for (let j = i; j < out.length; j++) {
          const b = j === i && part > 0 ? out[j]!.subarray(part) : out[j]!;
          if (k < ends.length && ends[k] === j + 1) {
            const cb = sents[k++]!;
            socket.write(b, () => cb());
          } else socket.write(b);
        }
        socket.uncork();
      }
    }
    for (let k = 0; k < done; k++) sents[k]!();
  }
}
