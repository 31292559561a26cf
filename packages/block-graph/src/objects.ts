// The objects of a graph, as QEMU's user-creatable objects under /objects: one registry of
// typed objects (tls-creds-psk, tls-creds-x509, throttle-group, secret, iothread), filled by the
// command line's --object and QMP's object-add, used by drivers (ctx.object: throttle's
// throttle-group, nbd's tls-creds) and by the app (its NBD server's tls-creds). Properties
// are checked with the option helpers drivers use, in QEMU's words; an object in use
// cannot be deleted.

import { accessSync, constants, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdTlsCreds } from './drivers/nbd.ts';
import {
  THROTTLE_LIMIT_KEYS,
  ThrottleGroup,
  throttleLimits,
  validateThrottleLimits,
} from './drivers/throttle.ts';
import { BlockError, BlockErrorCode, BlockOptionError } from './errors.ts';
import {
  bool,
  custom,
  enumOf,
  type Infer,
  int,
  type Optional,
  type OptionSyntax,
  opt,
  str,
  union,
} from './schema.ts';

/** A secret object's value (QEMU's `secret`: data or file, format raw or base64). */
export interface Secret {
  /** The secret's bytes (base64 decoded). */
  data: Buffer;
}

/** QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
const ID = /^[A-Za-z][A-Za-z0-9_.-]*$/;

const id = custom('str', (v, key, syntax) => {
  const name = str.parse(v, key, syntax);
  if (!ID.test(name))
    throw new BlockOptionError(
      key,
      'not an identifier',
      `Parameter '${key}' expects an identifier`,
    );
  return name;
});

/** QEMU's TlsCredsProperties (priority, a GnuTLS string, is taken; Node's TLS ignores it). */
const tlsCreds = {
  'verify-peer': opt(bool, true),
  dir: opt(str),
  endpoint: opt(enumOf(['client', 'server']), 'client'),
  priority: opt(str),
};

/** throttle-group takes `limits` and the same limits one by one as x-KEY (x-iops-total=100). */
const throttleGroup: Record<string, Optional<unknown, undefined>> = {
  limits: opt(throttleLimits),
  ...Object.fromEntries(THROTTLE_LIMIT_KEYS.map((k) => [`x-${k}`, opt(int())])),
};

/** QEMU's IothreadProperties (the thread itself is the app's: these are its settings). */
const iothread = {
  'aio-max-batch': opt(int()),
  'thread-pool-min': opt(int()),
  'thread-pool-max': opt(int()),
  'poll-max-ns': opt(int()),
  'poll-grow': opt(int()),
  'poll-shrink': opt(int()),
};

/** An iothread's settings, with QEMU 7.2's defaults. */
export interface IoThreadSettings {
  pollMaxNs: number;
  pollGrow: number;
  pollShrink: number;
  aioMaxBatch: number;
  threadPoolMin: number;
  threadPoolMax: number;
}

/** object-add's ObjectOptions (qapi/qom.json): qom-type, id, and the type's properties. */
export const objectOptions = union(
  'qom-type',
  { id },
  {
    secret: {
      loaded: opt(bool),
      format: opt(enumOf(['raw', 'base64']), 'raw'),
      keyid: opt(str),
      iv: opt(str),
      data: opt(str),
      file: opt(str),
    },
    'throttle-group': throttleGroup,
    iothread,
    'tls-creds-psk': { ...tlsCreds, username: opt(str) },
    'tls-creds-x509': tlsCreds,
  },
);
export type ObjectOptions = Infer<typeof objectOptions>;
export type ObjectType = ObjectOptions['qom-type'];

/** One object as query-objects would show it (QEMU's ObjectPropertyInfo-ish, plus users). */
export interface ObjectInfo {
  id: string;
  'qom-type': ObjectType;
  users: number;
  props: unknown;
}

/** What each type of object is to its users (ObjectRegistry.get and use). */
export interface ObjectValues {
  secret: Secret;
  'throttle-group': ThrottleGroup;
  iothread: IoThreadSettings;
  'tls-creds-psk': NbdTlsCreds;
  'tls-creds-x509': NbdTlsCreds;
}

interface Entry {
  type: ObjectType;
  users: number;
  props: Record<string, unknown>;
}

/**
 * Checks object-add's options (qom-type, id, properties) without creating anything (no
 * file is read): for the command line, checked before anything starts.
 */
export function checkObjectOptions(options: unknown, syntax: OptionSyntax = 'json'): ObjectOptions {
  const o = objectOptions.parse(options, '', syntax);
  check(o);
  return o;
}

/** The registry: one per graph (BlockGraph.objects). */
export class ObjectRegistry {
  private readonly objects = new Map<string, Entry>();
  /** The values by type, so that get() and use() answer with the type asked for. */
  private readonly values: { [T in ObjectType]: Map<string, ObjectValues[T]> } = {
    secret: new Map(),
    'throttle-group': new Map(),
    iothread: new Map(),
    'tls-creds-psk': new Map(),
    'tls-creds-x509': new Map(),
  };

  /** object-add / --object: checks, loads (reads its files), and registers the object. */
  add(options: unknown, syntax: OptionSyntax = 'json'): void {
    const o = checkObjectOptions(options, syntax);
    if (this.objects.has(o.id)) {
      throw new BlockError(
        BlockErrorCode.DUPLICATE_OBJECT,
        `attempt to add duplicate property '${o.id}' to object (type 'container')`,
      );
    }
    const { 'qom-type': type, id, ...props } = o;
    this.store(load(o), id);
    this.objects.set(id, { type, users: 0, props });
  }

  private store(loaded: Loaded, id: string): void {
    switch (loaded.type) {
      case 'secret':
        this.values.secret.set(id, loaded.value);
        break;
      case 'throttle-group':
        this.values['throttle-group'].set(id, loaded.value);
        break;
      case 'iothread':
        this.values.iothread.set(id, loaded.value);
        break;
      case 'tls-creds-psk':
      case 'tls-creds-x509':
        this.values[loaded.type].set(id, loaded.value);
        break;
    }
  }

  /** object-del: refused while a node (or the NBD server) uses the object. */
  del(id: string): void {
    const o = this.objects.get(id);
    if (!o) throw new BlockError(BlockErrorCode.OBJECT_NOT_FOUND, `object '${id}' not found`);
    if (o.users > 0) {
      throw new BlockError(
        BlockErrorCode.OBJECT_IN_USE,
        `object '${id}' is in use, can not be deleted`,
      );
    }
    this.objects.delete(id);
    this.values[o.type].delete(id);
  }

  /** The type of object `id`, if there is one. */
  typeOf(id: string): ObjectType | undefined {
    return this.objects.get(id)?.type;
  }

  /**
   * The value of object `id` of one of `types`, without taking it into use (as QEMU's NBD
   * server reads its tls-creds: deleting them later does not touch the running server);
   * a missing one, or one of another type, is a BlockOptionError on `key`.
   */
  get<T extends ObjectType>(types: T | readonly T[], id: string, key: string): ObjectValues[T] {
    const want: readonly T[] = typeof types === 'string' ? [types] : types;
    for (const type of want) {
      const value = this.values[type].get(id);
      if (value !== undefined) return value;
    }
    throw new BlockOptionError(key, `no ${want.join(' or ')} object with id '${id}'`);
  }

  /** As get(), and takes the object into use until release(id): it cannot be deleted. */
  use<T extends ObjectType>(types: T | readonly T[], id: string, key: string): ObjectValues[T] {
    const value = this.get(types, id, key);
    const o = this.objects.get(id);
    if (o) o.users++;
    return value;
  }

  /** Gives back a use taken by use(). */
  release(id: string): void {
    const o = this.objects.get(id);
    if (o && o.users > 0) o.users--;
  }

  /**
   * qom-set on a complete object, as QEMU's setters: a throttle-group's `limits` merge into
   * the live group's (checked first); its x-KEY properties are refused; any other property
   * takes the value, checked against its type, without touching what was loaded from it
   * (as QEMU's secret and tls-creds). Unknown properties are the caller's to refuse.
   */
  setProperty(id: string, name: string, value: unknown): void {
    const o = this.objects.get(id);
    if (!o) throw new BlockError(BlockErrorCode.OBJECT_NOT_FOUND, `object '${id}' not found`);
    if (o.type === 'throttle-group') {
      if (name !== 'limits') {
        throw new BlockOptionError(
          name,
          'cannot be set after initialization',
          'Property cannot be set after initialization',
        );
      }
      const group = this.values['throttle-group'].get(id)!;
      const given = throttleLimits.parse(value, 'limits', 'json');
      const merged = validateThrottleLimits({ ...group.limits, ...given }, 'limits');
      group.setLimits(merged);
      return;
    }
    const checked = objectOptions.parse(
      { ...o.props, 'qom-type': o.type, id, [name]: value },
      '',
      'json',
    );
    const value2 = (checked as Record<string, unknown>)[name];
    if (o.type === 'iothread') {
      this.values.iothread.set(id, ioThreadSettings({ ...o.props, [name]: value2 }));
    }
    o.props[name] = value2;
  }

  /** The objects, in the order they were added. */
  list(): ObjectInfo[] {
    return [...this.objects].map(([id, o]) => ({
      id,
      'qom-type': o.type,
      users: o.users,
      props: o.props,
    }));
  }
}

/** The checks QEMU makes when it completes an object, before any file is read. */
function check(o: ObjectOptions): void {
  switch (o['qom-type']) {
    case 'secret':
      if (o.keyid !== undefined || o.iv !== undefined) {
        const k = o.keyid !== undefined ? 'keyid' : 'iv';
        throw new BlockOptionError(k, 'encrypted secrets (keyid, iv) are not supported');
      }
      if (o.data !== undefined && o.file !== undefined) {
        throw new BlockOptionError('data', 'exclusive', "'file' and 'data' are mutually exclusive");
      }
      if (o.data === undefined && o.file === undefined) {
        throw new BlockOptionError('data', 'missing', "Either 'file' or 'data' must be provided");
      }
      if (o.format === 'base64' && o.data !== undefined) decodeBase64(o.data);
      return;
    case 'throttle-group':
      throttleGroupLimits(o);
      return;
    case 'iothread':
      ioThreadSettings(o);
      return;
    case 'tls-creds-psk':
    case 'tls-creds-x509':
      if (o.dir === undefined) {
        throw new BlockOptionError('dir', 'missing', "Missing 'dir' property value");
      }
      return;
  }
}

const INT64_MAX = '9223372036854775807';

/** An iothread's settings, checked as QEMU's iothread_set_param / thread-pool setters. */
function ioThreadSettings(o: Record<string, unknown>): IoThreadSettings {
  const get = (key: string, dflt: number): number => {
    const v = o[key];
    if (typeof v !== 'number') return dflt;
    if (v < 0) {
      throw new BlockOptionError(
        key,
        'negative',
        `${key} value must be in range [0, ${INT64_MAX}]`,
      );
    }
    return v;
  };
  const settings = {
    pollMaxNs: get('poll-max-ns', 32768),
    pollGrow: get('poll-grow', 0),
    pollShrink: get('poll-shrink', 0),
    aioMaxBatch: get('aio-max-batch', 0),
    threadPoolMin: get('thread-pool-min', 0),
    threadPoolMax: get('thread-pool-max', 64),
  };
  if (settings.threadPoolMin > settings.threadPoolMax || settings.threadPoolMax === 0) {
    throw new BlockOptionError(
      'thread-pool-min',
      'bad values',
      'bad thread-pool-min/thread-pool-max values',
    );
  }
  return settings;
}

/** A throttle-group's limits: `limits`, then the x-KEY properties over them. */
function throttleGroupLimits(o: Record<string, unknown>): Record<string, number> {
  const limits: Record<string, number> = {};
  for (const [k, v] of Object.entries(o.limits ?? {})) if (typeof v === 'number') limits[k] = v;
  for (const k of THROTTLE_LIMIT_KEYS) {
    const v = o[`x-${k}`];
    if (typeof v !== 'number') continue;
    if (v < 0) {
      throw new BlockOptionError(`x-${k}`, 'negative', 'Property values cannot be negative');
    }
    limits[k] = v;
  }
  validateThrottleLimits(limits, 'limits');
  return limits;
}

function decodeBase64(text: string): Buffer {
  // QEMU decodes strictly: only the alphabet, '=' only as padding.
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text)) {
    throw new BlockOptionError('data', 'not base64', 'Base64 data contains invalid characters');
  }
  return Buffer.from(text, 'base64');
}

type Loaded = {
  [T in ObjectType]: { type: T; value: ObjectValues[T] };
}[ObjectType];

/** Makes the object's value, reading what it needs from files, as QEMU completes it. */
function load(o: ObjectOptions): Loaded {
  check(o);
  switch (o['qom-type']) {
    case 'throttle-group':
      return { type: o['qom-type'], value: new ThrottleGroup(throttleGroupLimits(o)) };
    case 'iothread':
      return { type: o['qom-type'], value: ioThreadSettings(o) };
    case 'tls-creds-psk': {
      const dir = o.dir ?? '';
      // QEMU checks the key file at once (its content is read per session).
      const file = join(dir, 'keys.psk');
      try {
        accessSync(file, constants.R_OK);
      } catch (e) {
        throw new BlockOptionError(
          'dir',
          'cannot read keys.psk',
          `Unable to access credentials ${file}: ${describe(e)}`,
        );
      }
      return {
        type: o['qom-type'],
        value: new NbdTlsCreds({
          type: 'psk',
          dir,
          endpoint: o.endpoint,
          verifyPeer: o['verify-peer'],
          username: o.username,
        }),
      };
    }
    case 'tls-creds-x509':
      return {
        type: o['qom-type'],
        value: new NbdTlsCreds({
          type: 'x509',
          dir: o.dir ?? '',
          endpoint: o.endpoint,
          verifyPeer: o['verify-peer'],
        }),
      };
    case 'secret': {
      let text: Buffer;
      if (o.file !== undefined) {
        try {
          text = readFileSync(o.file);
        } catch (e) {
          throw new BlockOptionError(
            'file',
            'unreadable',
            `Unable to read ${o.file}: ${describe(e)}`,
          );
        }
      } else {
        text = Buffer.from(o.data ?? '', 'utf8');
      }
      const data = o.format === 'base64' ? decodeBase64(text.toString('latin1').trim()) : text;
      return { type: o['qom-type'], value: { data } };
    }
  }
}

function describe(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return 'No such file or directory';
  if (code === 'EACCES') return 'Permission denied';
  return (e as Error).message;
}
