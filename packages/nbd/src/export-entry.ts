// An export as the server holds it: its target, what it advertises, its counters and the
// connections in transmission on it.

import type { BlockSizeConstraints } from './export-target.ts';
import type { HandedOff, TransmissionOffer } from './handoff.ts';
import type { CompleteTarget } from './with-defaults.ts';

/** Per-export counters. */
export interface ExportStats {
  /** Requests received (every command but DISC). */
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests answered with an error. */
  errors: number;
  /** Requests being served now. */
  inFlight: number;
  /** Connections in transmission on this export now. */
  connections: number;
  /** Connections that entered transmission on this export, ever. */
  connectionsTotal: number;
  /** Requests received, by NBD command type (Command.READ...: the index). */
  commands: number[];
}

/** What the server does with a connection in transmission on an export. */
export interface AttachedConnection {
  /** The client asked to disconnect, broke the protocol or is gone. */
  readonly leaving: boolean;
  /** Hard disconnect. */
  destroy(): void;
}

/** An export as the server holds it. */
export interface ExportEntry {
  readonly name: string;
  readonly description: string;
  /** The target given, completed with what the server emulates (with-defaults.ts). */
  readonly target: CompleteTarget;
  readonly writable: boolean;
  readonly multiConn: boolean;
  readonly blockSize: BlockSizeConstraints;
  readonly stats: ExportStats;
  readonly connections: Set<AttachedConnection>;
  /** Serves a plain (not TLS) connection elsewhere, or declines (undefined). */
  readonly handoff: ((offer: TransmissionOffer) => HandedOff | undefined) | undefined;
  /** removeExport was called: no new clients. */
  removing: boolean;
}
