// The errors of @vmdisk/nbd: every error carries a stable `code` (messages may change,
// codes never do). Other modules of this package throw only what is defined here.

export class NbdError extends Error {
  override name = 'NbdError';
  readonly code: string;

  constructor(code: `ERR_VMDISK_NBD_${string}`, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

// ---- Server errors (NbdServer, MemoryTarget, FileTarget) ----
// Codes used with a plain NbdError by the server:
//   ERR_VMDISK_NBD_INVALID_ARGUMENT     a bad option given to the server, an export or a target
//   ERR_VMDISK_NBD_EXPORT_EXISTS        addExport with a name already taken
//   ERR_VMDISK_NBD_NO_SUCH_EXPORT       removeExport/exportStats of a name that is not there
//   ERR_VMDISK_NBD_EXPORT_IN_USE        a safe removeExport while clients are attached
//   ERR_VMDISK_NBD_SERVER_CLOSED        the server is closed (or closing)
//   ERR_VMDISK_NBD_PSK_FILE             a PSK file that cannot be read or parsed
// Codes carried by the server's 'error' events (the server keeps serving):
//   ERR_VMDISK_NBD_BAD_CLIENT           a client broke the protocol and was disconnected
//   ERR_VMDISK_NBD_HANDSHAKE_TIMEOUT    a client did not finish negotiating in time
//   ERR_VMDISK_NBD_TOO_MANY_CONNECTIONS a connection refused at maxConnections
//   ERR_VMDISK_NBD_CONFIGURE_SOCKET     the configureSocket option threw: the server refused
//                                       that connection, the client's connect failed
//   ERR_VMDISK_NBD_TLS_HANDSHAKE        a TLS handshake failed after STARTTLS
//   ERR_VMDISK_NBD_SOCKET_ERROR         a socket error (reset, broken pipe)
//   ERR_VMDISK_NBD_TARGET_ERROR         a target failed a request (the client got an errno)
// Codes of NbdSystemError (a system call failed; errno, errnoName and syscall kept):
//   ERR_VMDISK_NBD_LISTEN_FAILED        listen() could not bind (EADDRINUSE, EACCES...)
//   ERR_VMDISK_NBD_FILE_ERROR           FileTarget: open, read, write, fdatasync or close; a
//                                       READ's data read from a file (ExportTarget.fileRange)

/** A system call of the server or a FileTarget failed; keeps the system's errno. */
export class NbdSystemError extends NbdError {
  override name = 'NbdSystemError';
  /** The system error's number, name ('EIO') and syscall, when one caused this. */
  readonly errno?: number;
  readonly errnoName?: string;
  readonly syscall?: string;

  constructor(code: `ERR_VMDISK_NBD_${string}`, message: string, cause: unknown) {
    const sys = cause as { errno?: unknown; code?: unknown; syscall?: unknown; message?: unknown };
    super(code, typeof sys?.message === 'string' ? `${message}: ${sys.message}` : message, {
      cause,
    });
    if (sys && typeof sys.code === 'string' && /^E[A-Z0-9]+$/.test(sys.code)) {
      this.errnoName = sys.code;
      if (typeof sys.errno === 'number') this.errno = Math.abs(sys.errno);
      if (typeof sys.syscall === 'string') this.syscall = sys.syscall;
    }
  }
}

// ---- Client errors (NbdClient) ----
// Codes used with a plain NbdError by the client:
//   ERR_VMDISK_NBD_INVALID_URI        a malformed NBD URI
//   ERR_VMDISK_NBD_CONNECT_FAILED     the TCP or unix-socket connect failed (errnoName kept)
//   ERR_VMDISK_NBD_CONNECTION_LOST    the connection broke; every pending request fails with it
//   ERR_VMDISK_NBD_PROTOCOL_ERROR     the server broke the protocol (the client disconnects)
//   ERR_VMDISK_NBD_TLS_REQUIRED       the server wants TLS and none was configured
//   ERR_VMDISK_NBD_TLS_FAILED         TLS could not be set up (refused STARTTLS, handshake, files)
//   ERR_VMDISK_NBD_TIMEOUT            negotiation did not finish in time
//   ERR_VMDISK_NBD_ABORTED            the caller's AbortSignal fired during connect
//   ERR_VMDISK_NBD_INVALID_REQUEST    a request out of bounds, unaligned or malformed
//   ERR_VMDISK_NBD_UNSUPPORTED        the export did not advertise the command or flag
//   ERR_VMDISK_NBD_READ_ONLY          a write to a read-only export
//   ERR_VMDISK_NBD_CLIENT_CLOSED      the client was closed (or is closing)

/** A connection-level failure of the client; keeps the system's errno where there is one. */
export class NbdConnectionError extends NbdError {
  override name = 'NbdConnectionError';
  /** The system error's number, name ('ECONNREFUSED') and syscall, when one caused this. */
  readonly errno?: number;
  readonly errnoName?: string;
  readonly syscall?: string;

  constructor(code: `ERR_VMDISK_NBD_${string}`, message: string, cause?: unknown) {
    super(code, message, cause === undefined ? undefined : { cause });
    const sys = cause as { errno?: unknown; code?: unknown; syscall?: unknown } | undefined;
    if (sys && typeof sys.code === 'string' && /^E[A-Z0-9]+$/.test(sys.code)) {
      this.errnoName = sys.code;
      if (typeof sys.errno === 'number') this.errno = Math.abs(sys.errno);
      if (typeof sys.syscall === 'string') this.syscall = sys.syscall;
    }
  }
}

/** The server refused an option during negotiation (NBD_REP_ERR_*). */
export class NbdOptionError extends NbdError {
  override name = 'NbdOptionError';
  /** The option, e.g. 'GO'. */
  readonly option: string;
  /** The reply, e.g. 'ERR_UNKNOWN' (no such export) or 'ERR_POLICY'. */
  readonly reply: string;
  /** The server's own message, if it sent one. */
  readonly serverMessage: string;

  constructor(option: string, reply: string, serverMessage: string) {
    super(
      'ERR_VMDISK_NBD_OPTION_REFUSED',
      `the NBD server refused NBD_OPT_${option} with NBD_REP_${reply}` +
        (serverMessage ? `: ${serverMessage}` : ''),
    );
    this.option = option;
    this.reply = reply;
    this.serverMessage = serverMessage;
  }
}

/** The server failed a command: `errnoName` is the NBD error ('EIO', 'ENOSPC', 'EPERM'...). */
export class NbdCommandError extends NbdError {
  override name = 'NbdCommandError';
  /** The error number on the wire. */
  readonly errno: number;
  /** Its name; an unknown number reads as 'EINVAL', as the spec tells clients to treat it. */
  readonly errnoName: string;
  /** The command, e.g. 'WRITE'. */
  readonly command: string;
  readonly offset: number;
  readonly length: number;
  /** The server's message from a structured error chunk, if any. */
  readonly serverMessage: string;
  /** The offset an ERROR_OFFSET chunk pointed at. */
  readonly errorOffset?: number;

  constructor(
    command: string,
    offset: number,
    length: number,
    errno: number,
    errnoName: string,
    serverMessage = '',
    errorOffset?: number,
  ) {
    super(
      'ERR_VMDISK_NBD_COMMAND_FAILED',
      `NBD ${command} at ${offset} length ${length} failed with ${errnoName}` +
        (errorOffset !== undefined ? ` at offset ${errorOffset}` : '') +
        (serverMessage ? `: ${serverMessage}` : ''),
    );
    this.errno = errno;
    this.errnoName = errnoName;
    this.command = command;
    this.offset = offset;
    this.length = length;
    this.serverMessage = serverMessage;
    if (errorOffset !== undefined) this.errorOffset = errorOffset;
  }
}
