// `vm-disk serve` takes qemu-storage-daemon's options, so that its command lines work
// unchanged: --blockdev, --nbd-server, --export, --object (TLS credentials), --chardev
// with --monitor, --pidfile. Each option value is JSON (`{...}`) or QEMU's keyval syntax.
// Everything is checked here, before anything starts; an error names the option.
import { BadOptionError } from '../errors.ts';
import { type KeyvalObject, parseKeyval } from './keyval.ts';
import { checkStruct, type Schema, SchemaError } from './schema.ts';

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

export interface TlsCredsConfig {
  qomType: 'tls-creds-x509' | 'tls-creds-psk';
  id: string;
  dir: string;
  endpoint: 'server' | 'client';
  verifyPeer: boolean;
  username?: string;
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

export interface ServeConfig {
  /** --blockdev values as JSON objects, in order (keyval scalars are still strings). */
  blockdevs: Record<string, unknown>[];
  nbdServer?: NbdServerConfig;
  exports: ExportConfig[];
  objects: TlsCredsConfig[];
  monitors: MonitorConfig[];
  pidfile?: string;
}

const socketAddress: Schema = {
  type: { type: { enum: ['inet', 'unix'] }, required: true },
  host: { type: 'str' },
  port: { type: 'str' },
  path: { type: 'str' },
};

const nbdServerSchema: Schema = {
  addr: { type: { struct: socketAddress }, required: true },
  'tls-creds': { type: 'str' },
  'tls-authz': { type: 'str' },
  'max-connections': { type: 'int' },
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

const objectSchema: Schema = {
  'qom-type': { type: { enum: ['tls-creds-x509', 'tls-creds-psk'] }, required: true },
  id: { type: 'str', required: true },
  dir: { type: 'str', required: true },
  endpoint: { type: { enum: ['server', 'client'] } },
  'verify-peer': { type: 'bool' },
  username: { type: 'str' },
  priority: { type: 'str' },
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

/** The value of an option: a JSON object when it starts with '{', keyval otherwise. */
function parseValue(
  option: string,
  text: string,
  impliedKey?: string,
): KeyvalObject | Record<string, unknown> {
  try {
    if (text.trimStart().startsWith('{')) {
      const value: unknown = JSON.parse(text);
      if (typeof value !== 'object' || value === null || Array.isArray(value)) {
        throw new SchemaError('expected a JSON object');
      }
      return value as Record<string, unknown>;
    }
    return parseKeyval(text, impliedKey);
  } catch (e) {
    throw new BadOptionError(option, (e as Error).message, { cause: e });
  }
}

function check(
  option: string,
  value: Record<string, unknown>,
  schema: Schema,
): Record<string, unknown> {
  try {
    return checkStruct(value, schema);
  } catch (e) {
    throw new BadOptionError(option, (e as Error).message, { cause: e });
  }
}

function socketAddressOf(option: string, addr: Record<string, unknown>): SocketAddress {
  if (addr.type === 'inet') {
    if (typeof addr.host !== 'string')
      throw new BadOptionError(option, "Parameter 'addr.host' is missing");
    if (typeof addr.port !== 'string')
      throw new BadOptionError(option, "Parameter 'addr.port' is missing");
    if (addr.path !== undefined)
      throw new BadOptionError(option, "Parameter 'addr.path' is unexpected");
    return { type: 'inet', host: addr.host, port: addr.port };
  }
  if (typeof addr.path !== 'string')
    throw new BadOptionError(option, "Parameter 'addr.path' is missing");
  if (addr.host !== undefined || addr.port !== undefined) {
    throw new BadOptionError(
      option,
      `Parameter 'addr.${addr.host !== undefined ? 'host' : 'port'}' is unexpected`,
    );
  }
  return { type: 'unix', path: addr.path };
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
        config.blockdevs.push(parseValue(option, value) as Record<string, unknown>);
        break;
      case '--nbd-server': {
        if (config.nbdServer)
          throw new BadOptionError(option, 'only one --nbd-server can be given');
        const v = check(option, parseValue(option, value), nbdServerSchema);
        config.nbdServer = {
          addr: socketAddressOf(option, v.addr as Record<string, unknown>),
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
        const v = check(option, parseValue(option, value, 'qom-type'), objectSchema);
        uniqueId(option, v.id as string);
        config.objects.push({
          qomType: v['qom-type'] as TlsCredsConfig['qomType'],
          id: v.id as string,
          dir: v.dir as string,
          endpoint: (v.endpoint as 'server' | 'client' | undefined) ?? 'client',
          verifyPeer: (v['verify-peer'] as boolean | undefined) ?? true,
          ...(v.username !== undefined && { username: v.username as string }),
        });
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
    const creds = config.objects.find((o) => o.id === tlsCreds);
    if (!creds)
      throw new BadOptionError('--nbd-server', `No TLS credentials with id '${tlsCreds}'`);
    if (creds.endpoint !== 'server') {
      throw new BadOptionError(
        '--nbd-server',
        `TLS credentials '${tlsCreds}' are not for a server (endpoint=server)`,
      );
    }
  }
  const nodeNames = new Set(
    config.blockdevs.map((b) => b['node-name']).filter((n) => typeof n === 'string'),
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
