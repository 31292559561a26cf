// `vm-disk serve` takes qemu-storage-daemon's options, so that its command lines work
// unchanged: --blockdev, --nbd-server, --export, --object (the graph's objects), --chardev
// with --monitor, --pidfile. Each option value is JSON (`{...}`, typed as QMP's
// arguments) or QEMU's keyval syntax (strings the schema converts), as in QEMU.
// Everything is checked here, before anything starts (--blockdev's options are checked by
// the block graph, in their syntax); an error names the option.
import { checkObjectOptions } from '@vmdisk/block-graph';
import { BadOptionError } from '../errors.ts';
import { parseKeyval } from './keyval.ts';
import { checkStruct, type OptionSyntax, type Schema } from './schema.ts';

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
export const NBD_SERVER_EXTENSIONS: Schema = {
  'request-memory-budget': { type: 'size' },
};

export interface ExportConfig {
  type: 'nbd';
  id: string;
  nodeName: string;
  name?: string;
  description?: string;
  writable: boolean;
  allocationDepth: boolean;
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

export interface ServeConfig {
  /** --blockdev values, in order. */
  blockdevs: BlockdevConfig[];
  nbdServer?: NbdServerConfig;
  exports: ExportConfig[];
  /** --object values, in order (checked; created by the graph's object registry). */
  objects: BlockdevConfig[];
  monitors: MonitorConfig[];
  pidfile?: string;
}

/** QEMU's InetSocketAddress and UnixSocketAddress, the members vm-disk serves with. */
export const inetSocketAddress: Schema = {
  host: { type: 'str', required: true },
  port: { type: 'str', required: true },
};
export const unixSocketAddress: Schema = { path: { type: 'str', required: true } };

/** QEMU's SocketAddress (flat: `type` beside the address's members), inet and unix. */
const socketAddress = {
  union: {
    base: { type: { type: { enum: ['inet', 'unix'] }, required: true } },
    tag: 'type',
    variants: { inet: inetSocketAddress, unix: unixSocketAddress },
  },
} as const;

const nbdServerSchema: Schema = {
  addr: { type: socketAddress, required: true },
  'tls-creds': { type: 'str' },
  'tls-authz': { type: 'str' },
  'max-connections': { type: 'uint32' },
  ...NBD_SERVER_EXTENSIONS,
};

/** BlockExportOptions (nbd), as --export and QMP block-export-add take them. */
export const exportSchema: Schema = {
  type: { type: { enum: ['nbd'] }, required: true },
  id: { type: 'str', required: true },
  'node-name': { type: 'str', required: true },
  name: { type: 'str' },
  description: { type: 'str' },
  writable: { type: 'bool' },
  writethrough: { type: 'bool' },
  'allocation-depth': { type: 'bool' },
};

const chardevSchema: Schema = {
  backend: { type: { enum: ['socket'] }, required: true },
  id: { type: 'str', required: true },
  path: { type: 'str', required: true },
  server: { type: 'bool' },
  wait: { type: 'bool' },
};

const monitorSchema: Schema = {
  chardev: { type: 'str', required: true },
  mode: { type: { enum: ['control'] } },
  pretty: { type: 'bool' },
  id: { type: 'str' },
};

const VALUE_OPTIONS = new Set([
  '--blockdev',
  '--nbd-server',
  '--export',
  '--object',
  '--chardev',
  '--monitor',
  '--pidfile',
]);

/** An export's configuration from options checked against exportSchema. */
export function exportConfig(v: Record<string, unknown>): ExportConfig {
  return {
    type: 'nbd',
    id: v.id as string,
    nodeName: v['node-name'] as string,
    ...(v.name !== undefined && { name: v.name as string }),
    ...(v.description !== undefined && { description: v.description as string }),
    writable: (v.writable as boolean | undefined) ?? false,
    allocationDepth: (v['allocation-depth'] as boolean | undefined) ?? false,
  };
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
    throw new BadOptionError(option, (e as Error).message, { cause: e });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new BadOptionError(option, 'expected a JSON object');
  }
  return { options: value as Record<string, unknown>, syntax: 'json' };
}

function check(option: string, value: BlockdevConfig, schema: Schema): Record<string, unknown> {
  try {
    return checkStruct(value.options, schema, value.syntax);
  } catch (e) {
    throw new BadOptionError(option, (e as Error).message, { cause: e });
  }
}

/** A checked SocketAddress (socketAddress above) as the daemon takes it. */
export function socketAddressOf(addr: Record<string, unknown>): SocketAddress {
  return addr.type === 'inet'
    ? { type: 'inet', host: addr.host as string, port: addr.port as string }
    : { type: 'unix', path: addr.path as string };
}

/** Parses `vm-disk serve`'s arguments (after `serve`). */
export function parseServeOptions(argv: readonly string[]): ServeConfig {
  const raw: { option: string; value: string }[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
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
        const v = check(option, parseValue(option, value), nbdServerSchema);
        config.nbdServer = {
          addr: socketAddressOf(v.addr as Record<string, unknown>),
          ...(v['tls-creds'] !== undefined && { tlsCreds: v['tls-creds'] as string }),
          ...(v['max-connections'] !== undefined && {
            maxConnections: v['max-connections'] as number,
          }),
          ...(v['request-memory-budget'] !== undefined && {
            requestMemoryBudget: v['request-memory-budget'] as number,
          }),
        };
        break;
      }
      case '--export': {
        const v = check(option, parseValue(option, value), exportSchema);
        uniqueId(option, v.id as string);
        config.exports.push(exportConfig(v));
        break;
      }
      case '--object': {
        // Checked by the graph's object registry, in its syntax; created at start.
        const object = parseValue(option, value, 'qom-type');
        let id: string;
        try {
          id = checkObjectOptions(object.options, object.syntax).id;
        } catch (e) {
          throw new BadOptionError(option, (e as Error).message, { cause: e });
        }
        uniqueId(option, id);
        config.objects.push(object);
        break;
      }
      case '--chardev': {
        const v = check(option, parseValue(option, value, 'backend'), chardevSchema);
        uniqueId(option, v.id as string);
        chardevs.set(v.id as string, {
          id: v.id as string,
          path: v.path as string,
          server: (v.server as boolean | undefined) ?? false,
          wait: (v.wait as boolean | undefined) ?? true,
        });
        break;
      }
      case '--monitor': {
        const v = check(option, parseValue(option, value, 'chardev'), monitorSchema);
        monitorRefs.push({
          chardev: v.chardev as string,
          pretty: (v.pretty as boolean | undefined) ?? false,
        });
        break;
      }
      case '--pidfile':
        config.pidfile = value;
        break;
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
    const creds = config.objects.find((o) => o.options.id === tlsCreds)?.options;
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
  if (config.exports.length > 0 && !config.nbdServer) {
    throw new BadOptionError('--export', 'NBD exports need an --nbd-server');
  }
  return config;
}
