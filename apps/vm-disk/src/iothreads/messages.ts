// The messages between the main thread and an iothread's worker (plain data: posted
// through the worker's port; request data in SharedArrayBuffer-backed views, not copied).
import type { BlockSizeConstraints, TransmissionState } from '@vmdisk/nbd';

/** What a worker needs to serve an export as the main thread's NBD server offers it. */
export interface WorkerExport {
  name: string;
  description: string;
  size: number;
  writable: boolean;
  allocationDepth: boolean;
  blockSize: BlockSizeConstraints;
}

/** A request forwarded to the main thread (run through the export's BlockBackend). */
export type ForwardOp =
  | { op: 'read'; offset: number; buf: Uint8Array }
  | { op: 'write'; offset: number; buf: Uint8Array; fua: boolean }
  | { op: 'flush' }
  | { op: 'trim'; offset: number; length: number; fua: boolean }
  | {
      op: 'zero';
      offset: number;
      length: number;
      fua: boolean;
      noHole: boolean;
      fastZero: boolean;
    }
  | { op: 'status'; offset: number; length: number };

export interface ForwardedError {
  errnoName: string | undefined;
  message: string;
}

export interface ForwardExtent {
  length: number;
  hole: boolean;
  zero: boolean;
  depth?: number;
}

/** The file an export's node reads from, as a worker opens it for the fast path. */
export interface FastFile {
  filename: string;
  direct: boolean;
  aio?: string;
}

export type ToWorker =
  | { t: 'export-add'; export: WorkerExport }
  | { t: 'export-del'; name: string }
  /** A connection handed off: `fd` is the worker's (a dup), `conn` the main thread's number. */
  | { t: 'adopt'; conn: number; fd: number; name: string; state: TransmissionState }
  | { t: 'destroy'; conn: number }
  /** READs of the export may be served from `file` (the main thread holds the lease). */
  | { t: 'fast-on'; name: string; file: FastFile }
  /** No more: stop, wait for the reads in flight, answer fast-off-done. */
  | { t: 'fast-off'; name: string }
  | { t: 'reply'; id: number; error?: ForwardedError; extents?: ForwardExtent[] };

export type FromWorker =
  | { t: 'io'; id: number; name: string; req: ForwardOp }
  /** The connection is over and nothing of it is in flight. */
  | { t: 'closed'; conn: number }
  | { t: 'fast-off-done'; name: string }
  | { t: 'log'; level: 'info' | 'warn'; msg: string; data: Record<string, unknown> };
