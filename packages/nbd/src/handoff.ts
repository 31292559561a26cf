// Handing a connection in transmission to another server (e.g. in a worker thread): the
// negotiated state the other side needs to go on, as plain data that can be posted.

import type { Socket } from 'node:net';

/** What a connection agreed in its handshake, and what it received after it. */
export interface TransmissionState {
  /** The reply mode (simple, structured, extended), as the server numbers it. */
  readonly mode: number;
  /** The meta contexts selected, as the export numbers them. */
  readonly contexts: readonly number[];
  /** The reply that ends the handshake, not yet sent: the taker sends it first. */
  readonly reply: Uint8Array;
  /** Bytes the client sent after the handshake, already read: the taker's first input. */
  readonly pending: Uint8Array;
}

/** A connection offered to an export's `handoff`. */
export interface TransmissionOffer {
  /** The server's number for the connection. */
  readonly id: number;
  /**
   * The socket, no longer read by the server and with none of its listeners: the taker
   * owns it (e.g. duplicates its fd for a worker thread, then destroys it).
   */
  readonly socket: Socket;
  readonly state: TransmissionState;
  /** The taker calls it once the connection is over and nothing of it is in flight. */
  readonly done: () => void;
}

/** A connection served elsewhere, as the server that handed it off still sees it. */
export interface HandedOff {
  /** Hard disconnect (block-export-del mode=hard, the server closing). */
  destroy(): void;
}
