// The worker's side of the fast path (fast-reads.ts): READs of an export served from its
// file with the worker's own block graph and engine (io_uring ring), between the main
// thread's fast-on and fast-off. The file is opened without locks: the main thread's node
// holds them.
import { type BlockBackend, BlockGraph, type FileRange } from '@vmdisk/block-graph';
import type { FastFile } from './messages.ts';

export class LocalReads {
  private file: FastFile | undefined;
  private opened: Promise<{ graph: BlockGraph; backend: BlockBackend }> | undefined;
  private backend: BlockBackend | undefined;
  private on = false;
  private inFlight = 0;
  private idle: (() => void)[] = [];

  /** Reads may be served here once the file is open. */
  start(file: FastFile): void {
    this.on = true;
    const same =
      this.file !== undefined &&
      this.file.filename === file.filename &&
      this.file.direct === file.direct &&
      this.file.aio === file.aio;
    if (same) return;
    void this.close();
    this.file = file;
    const opened = open(file);
    this.opened = opened;
    opened.then(
      ({ backend }) => {
        if (this.opened === opened) this.backend = backend;
      },
      () => {
        // Not readable here: everything stays forwarded.
        if (this.opened === opened) this.opened = undefined;
      },
    );
  }

  /** No more reads here; resolves when those in flight are done. */
  async stop(): Promise<void> {
    this.on = false;
    if (this.inFlight === 0) return;
    await new Promise<void>((resolve) => this.idle.push(resolve));
  }

  /** A read served here, or undefined: forward it. */
  read(offset: number, buf: Uint8Array): Promise<void> | undefined {
    const backend = this.backend;
    if (!this.on || backend === undefined) return undefined;
    this.inFlight++;
    return backend.read(offset, buf).finally(() => {
      if (--this.inFlight === 0 && this.idle.length > 0) {
        const idle = this.idle;
        this.idle = [];
        for (const w of idle) w();
      }
    });
  }

  /**
   * Where a read served here would read, when its bytes are cached in the file
   * (BlockBackend.fileRange): the server sends them from there in this same turn, while
   * the file is still open (close waits for the next turns).
   */
  fileRange(offset: number, length: number): FileRange | undefined {
    return this.on ? this.backend?.fileRange(offset, length) : undefined;
  }

  async close(): Promise<void> {
    const opened = this.opened;
    this.opened = undefined;
    this.backend = undefined;
    this.file = undefined;
    if (opened === undefined) return;
    await this.stop();
    const { graph } = await opened.catch(() => ({ graph: undefined }));
    await graph?.close();
  }
}

async function open(file: FastFile): Promise<{ graph: BlockGraph; backend: BlockBackend }> {
  const graph = new BlockGraph();
  await graph.add({
    driver: 'file',
    'node-name': 'file',
    filename: file.filename,
    'read-only': true,
    locking: 'off',
    cache: { direct: file.direct },
    ...(file.aio !== undefined && { aio: file.aio }),
  });
  const backend = await graph.createBackend('file', { name: 'iothread-reads' });
  return { graph, backend };
}
