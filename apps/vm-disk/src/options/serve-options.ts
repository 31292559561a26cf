// `vm-disk serve` takes qemu-storage-daemon's options, so that its command lines work
// unchanged: --blockdev, --nbd-server, --export, --object (the graph's objects), --chardev
// with --monitor, --pidfile; and vm-disk's own --metrics (a Prometheus endpoint). Each
// option value is JSON (`{...}`, typed as QMP's arguments) or QEMU's keyval syntax
// (strings the schema converts), as in QEMU. Everything is checked here, before anything
// starts (--blockdev's options are checked by the block graph, in their syntax); an error
// names the option.
import {
  type BlockDirtyBitmapOrStr,
  blockDirtyBitmapOrStr,
  checkObjectOptions,
  type Infer,
  type ObjectOptions,
  type OptionSyntax,
  schema,
} from '@vmdisk/block-graph';
import { BadOptionError } from '../errors.ts';
import { parseKeyval } from './keyval.ts';

const { bool, enumOf, list, opt, size, str, struct, uint32, union } = schema;

export type SocketAddress =
  | { type: 'inet'; host: string; port: string }
  | { type: 'unix'; path: string };

export interface NbdServerConfig {
  addr: SocketAddress;
  tlsCreds?: string;
  maxConnections?: number;
  /** vm-disk's extension `request-memory-budget` (bytes): see NBD_SERVER_EXTENSIONS. */
  requestMemoryBudget?: number;
}

/**
 * Keys of --nbd-server and nbd-server-start that qemu-storage-daemon does not have:
 * `request-memory-budget` (a size: bytes of NBD request data in flight, all clients
 * together; default 256M).
 */
export const NBD_SERVER_EXTENSIONS = {
  'request-memory-budget': opt(size),
};

/** Any export --export and block-export-add create. */
export type ExportConfig = NbdExportConfig | VhostUserBlkExportConfig | FuseExportConfig;

export interface NbdExportConfig {
  type: 'nbd';
  id: string;
  nodeName: string;
  name?: string;
  description?: string;
  writable: boolean;
  allocationDepth: boolean;
  /** Dirty bitmaps offered as qemu:dirty-bitmap:NAME: names on the node (or below), or {node, name}. */
  bitmaps?: BlockDirtyBitmapOrStr[];
  /**
   * The iothreads serving its connections (`iothread`: one id, or a list for multi-queue
   * as QEMU 9's form, round-robin over them; raw and file nodes only).
   */
  iothread?: { ids: string[]; list: boolean };
}

/** A vhost-user-blk export (BlockExportOptionsVhostUserBlk). */
export interface VhostUserBlkExportConfig {
  type: 'vhost-user-blk';
  id: string;
  nodeName: string;
  writable: boolean;
  addr: SocketAddress;
  logicalBlockSize: number;
  numQueues: number;
  /** Every write flushed before it completes (block-export-add's writethrough, default off). */
  writethrough: boolean;
}

/** A FUSE export (`type=fuse`): the node as a regular file mounted over `mountpoint`. */
export interface FuseExportConfig {
  type: 'fuse';
  id: string;
  nodeName: string;
  mountpoint: string;
  writable: boolean;
  growable: boolean;
  allowOther: 'on' | 'off' | 'auto';
}

export interface ChardevConfig {
  id: string;
  path: string;
  server: boolean;
  wait: boolean;
}

export interface MonitorConfig {
  chardev: ChardevConfig;
  pretty: boolean;
}

/** A --blockdev value: its options, and their syntax (keyval scalars are still strings). */
export interface BlockdevConfig {
  options: Record<string, unknown>;
  syntax: OptionSyntax;
}

/** --metrics (vm-disk's own): where the Prometheus endpoint listens. */
export interface MetricsConfig {
  addr: SocketAddress;
}

export interface ServeConfig {
  /** --blockdev values, in order. */
  blockdevs: BlockdevConfig[];
  nbdServer?: NbdServerConfig;
  exports: ExportConfig[];
  /** --object values, in order (checked; created by the graph's object registry). */
  objects: BlockdevConfig[];
  monitors: MonitorConfig[];
  pidfile?: string;
  metrics?: MetricsConfig;
}

/** QEMU's InetSocketAddress and UnixSocketAddress, the members vm-disk serves with. */
export const inetSocketAddress = { host: str, port: str };
export const unixSocketAddress = { path: str };

/** QEMU's SocketAddress (flat: `type` beside the address's members), inet and unix. */
const socketAddress = union('type', {}, { inet: inetSocketAddress, unix: unixSocketAddress });

const nbdServerOptions = struct({
  addr: socketAddress,
  'tls-creds': opt(str),
  'tls-authz': opt(str),
  'max-connections': opt(uint32),
  ...NBD_SERVER_EXTENSIONS,
});

/** uint16, with QEMU's words ("Parameter 'num-queues' expects uint16_t"). */
const uint16 = schema.custom('uint16', (v, key, syntax) => {
  if (typeof v === 'string' && v.startsWith('-')) throw schema.optionExpects(key, 'uint16_t');
  const n = uint32.parse(v, key, syntax);
  if (n > 0xffff) throw schema.optionExpects(key, 'uint16_t');
  return n;
});

/**
 * `iothread`: an iothread's id (QEMU 7.2), or a list of them (QEMU 9's multi-queue form;
 * keyval iothread.0=io0,iothread.1=io1).
 */
const iothreadOption = schema.custom('StrOrList', (v, key, syntax) => {
  if (typeof v === 'string') return { ids: [v], list: false };
  if (Array.isArray(v) || (syntax === 'keyval' && isObject(v))) {
    const ids = list(str).parse(v, key, syntax);
    if (ids.length === 0) throw schema.optionExpects(key, 'a non-empty list of iothreads');
    return { ids, list: true };
  }
  throw schema.optionTypeError(key, 'string');
});

/** BlockExportOptions (nbd, vhost-user-blk), as --export and QMP block-export-add take them. */
export const exportOptions = union(
  'type',
  {
    id: str,
    'fixed-iothread': opt(bool),
    iothread: opt(iothreadOption),
    'node-name': str,
    writable: opt(bool, false),
    writethrough: opt(bool),
  },
  {
    nbd: {
      name: opt(str),
      description: opt(str),
      bitmaps: opt(list(blockDirtyBitmapOrStr)),
      'allocation-depth': opt(bool, false),
    },
    'vhost-user-blk': {
      addr: socketAddress,
      'logical-block-size': opt(size, 512),
      'num-queues': opt(uint16, 1),
    },
    fuse: {
      mountpoint: str,
      growable: opt(bool, false),
      'allow-other': opt(enumOf(['off', 'on', 'auto']), 'auto'),
    },
  },
);

/** ObjectOptions as the registry checks them (without reading any file). */
const objectOptions = schema.custom('ObjectOptions', (v, _key, syntax) =>
  checkObjectOptions(v, syntax),
);

/** --metrics addr.type=inet,addr.host=H,addr.port=P (or addr.type=unix,addr.path=P). */
const metricsOptions = struct({ addr: socketAddress });

const chardevOptions = struct({
  backend: enumOf(['socket']),
  id: str,
  path: str,
  server: opt(bool, false),
  wait: opt(bool, true),
});

const monitorOptions = struct({
  chardev: str,
  mode: opt(enumOf(['control'])),
  pretty: opt(bool, false),
  id: opt(str),
});

const VALUE_OPTIONS = new Set([
  '--blockdev',
  '--nbd-server',
  '--export',
  '--object',
  '--chardev',
  '--monitor',
  '--pidfile',
  '--metrics',
]);

/** An export's configuration from checked options. */
export function exportConfig(v: Infer<typeof exportOptions>): ExportConfig {
  if (v.type === 'vhost-user-blk') {
    return {
      type: v.type,
      id: v.id,
      nodeName: v['node-name'],
      writable: v.writable,
      addr: v.addr,
      logicalBlockSize: v['logical-block-size'],
      numQueues: v['num-queues'],
      writethrough: v.writethrough ?? false,
    };
  }
  if (v.type === 'fuse') {
    return {
      type: v.type,
      id: v.id,
      nodeName: v['node-name'],
      mountpoint: v.mountpoint,
      writable: v.writable,
      growable: v.growable,
      allowOther: v['allow-other'],
    };
  }
  return {
    type: v.type,
    id: v.id,
    nodeName: v['node-name'],
    ...(v.name !== undefined && { name: v.name }),
    ...(v.description !== undefined && { description: v.description }),
    writable: v.writable,
    allocationDepth: v['allocation-depth'],
    ...(v.bitmaps !== undefined && { bitmaps: v.bitmaps }),
    ...(v.iothread !== undefined && { iothread: v.iothread }),
  };
}

/** The NBD server's configuration from checked --nbd-server (or nbd-server-start) options. */
export function nbdServerConfig(
  v: Omit<Infer<typeof nbdServerOptions>, 'addr'>,
  addr: SocketAddress,
): NbdServerConfig {
  return {
    addr,
    ...(v['tls-creds'] !== undefined && { tlsCreds: v['tls-creds'] }),
    ...(v['max-connections'] !== undefined && { maxConnections: v['max-connections'] }),
    ...(v['request-memory-budget'] !== undefined && {
      requestMemoryBudget: v['request-memory-budget'],
    }),
  };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** An option's value: a JSON object (typed) when it starts with '{', keyval otherwise. */
function parseValue(option: string, text: string, impliedKey?: string): BlockdevConfig {
  let value: unknown;
  try {
    if (!text.trimStart().startsWith('{')) {
      return { options: parseKeyval(text, impliedKey), syntax: 'keyval' };
    }
    value = JSON.parse(text);
  } catch (e) {
    throw new BadOptionError(option, e instanceof Error ? e.message : String(e), { cause: e });
  }
  if (!isObject(value)) throw new BadOptionError(option, 'expected a JSON object');
  return { options: value, syntax: 'json' };
}

/** Checks an option's value against its schema; errors name the option. */
function check<T>(option: string, value: BlockdevConfig, type: schema.Type<T>): T {
  try {
    return type.parse(value.options, '', value.syntax);
  } catch (e) {
    throw new BadOptionError(option, e instanceof Error ? e.message : String(e), { cause: e });
  }
}

/** Parses `vm-disk serve`'s arguments (after `serve`). */
export function parseServeOptions(argv: readonly string[]): ServeConfig {
  const raw: { option: string; value: string }[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] ?? '';
    const eq = arg.startsWith('--') ? arg.indexOf('=') : -1;
    const option = eq > 0 ? arg.slice(0, eq) : arg;
    if (!VALUE_OPTIONS.has(option)) {
      throw new BadOptionError(
        option,
        arg.startsWith('-') ? 'unknown option' : 'unexpected argument',
      );
    }
    let value: string | undefined;
    if (eq > 0) {
      value = arg.slice(eq + 1);
    } else {
      value = argv[++i];
      if (value === undefined) throw new BadOptionError(option, 'requires a value');
    }
    raw.push({ option, value });
  }

  const config: ServeConfig = { blockdevs: [], exports: [], objects: [], monitors: [] };
  const chardevs = new Map<string, ChardevConfig>();
  const objects = new Map<string, ObjectOptions>();
  const monitorRefs: { chardev: string; pretty: boolean }[] = [];
  const ids = new Set<string>();
  const uniqueId = (option: string, id: string) => {
    if (ids.has(id)) throw new BadOptionError(option, `Duplicate ID '${id}'`);
    ids.add(id);
  };

  for (const { option, value } of raw) {
    switch (option) {
      case '--blockdev':
        config.blockdevs.push(parseValue(option, value));
        break;
      case '--nbd-server': {
        if (config.nbdServer)
          throw new BadOptionError(option, 'only one --nbd-server can be given');
        const { addr, ...v } = check(option, parseValue(option, value), nbdServerOptions);
        config.nbdServer = nbdServerConfig(v, addr);
        break;
      }
      case '--export': {
        const v = check(option, parseValue(option, value), exportOptions);
        uniqueId(option, v.id);
        config.exports.push(exportConfig(v));
        break;
      }
      case '--object': {
        // Checked by the graph's object registry, in its syntax; created at start.
        const object = parseValue(option, value, 'qom-type');
        const checked = check(option, object, objectOptions);
        uniqueId(option, checked.id);
        objects.set(checked.id, checked);
        config.objects.push(object);
        break;
      }
      case '--chardev': {
        const v = check(option, parseValue(option, value, 'backend'), chardevOptions);
        uniqueId(option, v.id);
        chardevs.set(v.id, { id: v.id, path: v.path, server: v.server, wait: v.wait });
        break;
      }
      case '--monitor': {
        const v = check(option, parseValue(option, value, 'chardev'), monitorOptions);
        monitorRefs.push({ chardev: v.chardev, pretty: v.pretty });
        break;
      }
      case '--pidfile':
        config.pidfile = value;
        break;
      case '--metrics': {
        if (config.metrics) throw new BadOptionError(option, 'only one --metrics can be given');
        config.metrics = check(option, parseValue(option, value), metricsOptions);
        break;
      }
    }
  }

  for (const ref of monitorRefs) {
    const chardev = chardevs.get(ref.chardev);
    if (!chardev) throw new BadOptionError('--monitor', `chardev '${ref.chardev}' not found`);
    if (!chardev.server)
      throw new BadOptionError('--chardev', `'${chardev.id}': vm-disk monitors need server=on`);
    config.monitors.push({ chardev, pretty: ref.pretty });
  }
  const tlsCreds = config.nbdServer?.tlsCreds;
  if (tlsCreds !== undefined) {
    const creds = objects.get(tlsCreds);
    if (creds?.['qom-type'] !== 'tls-creds-psk' && creds?.['qom-type'] !== 'tls-creds-x509')
      throw new BadOptionError('--nbd-server', `No TLS credentials with id '${tlsCreds}'`);
    if (creds.endpoint !== 'server') {
      throw new BadOptionError(
        '--nbd-server',
        `TLS credentials '${tlsCreds}' are not for a server (endpoint=server)`,
      );
    }
  }
  const nodeNames = new Set(
    config.blockdevs.map((b) => b.options['node-name']).filter((n) => typeof n === 'string'),
  );
  for (const e of config.exports) {
    if (!nodeNames.has(e.nodeName)) {
      throw new BadOptionError(
        '--export',
        `'${e.id}': no --blockdev has node-name '${e.nodeName}'`,
      );
    }
  }
  if (config.exports.some((e) => e.type === 'nbd') && !config.nbdServer) {
    throw new BadOptionError('--export', 'NBD exports need an --nbd-server');
  }
  return config;
}
