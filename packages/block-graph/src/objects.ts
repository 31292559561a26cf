// The objects of a graph, as QEMU's user-creatable objects under /objects: one registry of
// typed objects (tls-creds-psk, tls-creds-x509, throttle-group, secret), filled by the
// command line's --object and QMP's object-add, used by drivers (ctx.object: throttle's
// throttle-group, nbd's tls-creds) and by the app (its NBD server's tls-creds). Properties
// are checked with the option helpers drivers use, in QEMU's words; an object in use
// cannot be deleted.

import { accessSync, constants, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createTlsCreds } from './drivers/nbd.ts';
import { createThrottleGroup, THROTTLE_LIMIT_KEYS } from './drivers/throttle.ts';
import { BlockError, BlockErrorCode, BlockOptionError } from './errors.ts';
import {
  keyEnum,
  keyInt,
  keyObject,
  keyString,
  type OptionSyntax,
  optionExpects,
  optionMissing,
  optionUnexpected,
} from './options.ts';

export const OBJECT_TYPES = [
  'secret',
  'throttle-group',
  'tls-creds-psk',
  'tls-creds-x509',
] as const;
export type ObjectType = (typeof OBJECT_TYPES)[number];

/** A secret object's value (QEMU's `secret`: data or file, format raw or base64). */
export interface Secret {
  /** The secret's bytes (base64 decoded). */
  data: Buffer;
}

/** object-add's options, checked: qom-type, id, and the type's properties. */
export interface ObjectOptions {
  type: ObjectType;
  id: string;
  props: Record<string, unknown>;
}

/** One object as query-objects would show it (QEMU's ObjectPropertyInfo-ish, plus users). */
export interface ObjectInfo {
  id: string;
  'qom-type': ObjectType;
  users: number;
  props: unknown;
}

interface Entry {
  type: ObjectType;
  value: unknown;
  users: number;
  props: Record<string, unknown>;
}

/** QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
const ID = /^[A-Za-z][A-Za-z0-9_.-]*$/;

/**
 * Checks object-add's options (qom-type, id, properties) without creating anything (no
 * file is read): for the command line, checked before anything starts.
 */
export function checkObjectOptions(options: unknown, syntax: OptionSyntax = 'json'): ObjectOptions {
  const o = keyObject(options, '(object)');
  const { 'qom-type': qomType, id, ...props } = o;
  if (qomType === undefined) throw optionMissing('qom-type');
  const type = keyEnum(qomType, 'qom-type', OBJECT_TYPES);
  if (id === undefined) throw optionMissing('id');
  const name = keyString(id, 'id');
  if (!ID.test(name)) throw optionExpects('id', 'an identifier');
  parse(type, props, syntax);
  return { type, id: name, props };
}

/** The registry: one per graph (BlockGraph.objects). */
export class ObjectRegistry {
  private readonly objects = new Map<string, Entry>();

  /** object-add / --object: checks, loads (reads its files), and registers the object. */
  add(options: unknown, syntax: OptionSyntax = 'json'): void {
    const { type, id, props } = checkObjectOptions(options, syntax);
    if (this.objects.has(id)) {
      throw new BlockError(
        BlockErrorCode.DUPLICATE_OBJECT,
        `attempt to add duplicate property '${id}' to object (type 'container')`,
      );
    }
    const value = load(parse(type, props, syntax));
    this.objects.set(id, { type, value, users: 0, props });
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
  get(types: ObjectType | readonly ObjectType[], id: string, key: string): unknown {
    return this.entry(types, id, key).value;
  }

  /** As get(), and takes the object into use until release(id): it cannot be deleted. */
  use(types: ObjectType | readonly ObjectType[], id: string, key: string): unknown {
    const o = this.entry(types, id, key);
    o.users++;
    return o.value;
  }

  /** Gives back a use taken by use(). */
  release(id: string): void {
    const o = this.objects.get(id);
    if (o && o.users > 0) o.users--;
  }

  private entry(types: ObjectType | readonly ObjectType[], id: string, key: string): Entry {
    const want: readonly ObjectType[] = typeof types === 'string' ? [types] : types;
    const o = this.objects.get(id);
    if (!o || !want.includes(o.type)) {
      throw new BlockOptionError(key, `no ${want.join(' or ')} object with id '${id}'`);
    }
    return o;
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

type Parsed =
  | { type: 'throttle-group'; value: unknown }
  | { type: 'tls-creds-psk' | 'tls-creds-x509'; value: ReturnType<typeof createTlsCreds> }
  | { type: 'secret'; data?: string; file?: string; format: 'raw' | 'base64' };

function parse(type: ObjectType, props: Record<string, unknown>, syntax: OptionSyntax): Parsed {
  switch (type) {
    case 'throttle-group':
      return { type, value: createThrottleGroup(throttleProps(props, syntax), 'json') };
    case 'tls-creds-psk':
    case 'tls-creds-x509':
      return { type, value: createTlsCreds(type, props, syntax) };
    case 'secret':
      return parseSecret(props);
  }
}

/**
 * A throttle-group's properties as { limits }: QEMU takes `limits` and the same limits
 * one by one as x-KEY (x-iops-total=100), the command line's way.
 */
function throttleProps(
  props: Record<string, unknown>,
  syntax: OptionSyntax,
): Record<string, unknown> {
  const limits: Record<string, unknown> = {};
  if (props.limits !== undefined) {
    const given = keyObject(props.limits, 'limits', 'ThrottleLimits');
    for (const [k, v] of Object.entries(given)) {
      if (!THROTTLE_LIMIT_KEYS.includes(k)) throw optionUnexpected(`limits.${k}`);
      limits[k] = keyInt(v, `limits.${k}`, syntax, 0);
    }
  }
  for (const [k, v] of Object.entries(props)) {
    if (k === 'limits') continue;
    const limit = k.startsWith('x-') ? k.slice(2) : undefined;
    if (limit === undefined || !THROTTLE_LIMIT_KEYS.includes(limit)) throw optionUnexpected(k);
    limits[limit] = keyInt(v, k, syntax, 0);
  }
  return { limits };
}

function parseSecret(props: Record<string, unknown>): Parsed {
  for (const k of Object.keys(props)) {
    if (k === 'keyid' || k === 'iv') {
      throw new BlockOptionError(k, 'encrypted secrets (keyid, iv) are not supported');
    }
    if (k !== 'data' && k !== 'file' && k !== 'format' && k !== 'loaded') {
      throw optionUnexpected(k);
    }
  }
  const data = props.data === undefined ? undefined : keyString(props.data, 'data');
  const file = props.file === undefined ? undefined : keyString(props.file, 'file');
  const format =
    props.format === undefined ? 'raw' : keyEnum(props.format, 'format', ['raw', 'base64']);
  if (data !== undefined && file !== undefined) {
    throw new BlockOptionError('data', 'exclusive', "'file' and 'data' are mutually exclusive");
  }
  if (data === undefined && file === undefined) {
    throw new BlockOptionError('data', 'missing', "Either 'file' or 'data' must be provided");
  }
  if (format === 'base64' && data !== undefined) decodeBase64(data);
  return {
    type: 'secret',
    format,
    ...(data !== undefined && { data }),
    ...(file !== undefined && { file }),
  };
}

function decodeBase64(text: string): Buffer {
  // QEMU decodes strictly: only the alphabet, '=' only as padding.
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text)) {
    throw new BlockOptionError('data', 'not base64', 'Base64 data contains invalid characters');
  }
  return Buffer.from(text, 'base64');
}

/** Reads what an object needs from files, as QEMU does when it completes the object. */
function load(p: Parsed): unknown {
  switch (p.type) {
    case 'throttle-group':
      return p.value;
    case 'tls-creds-psk': {
      // QEMU checks the key file at once (its content is read per session).
      const file = join(p.value.dir, 'keys.psk');
      try {
        accessSync(file, constants.R_OK);
      } catch (e) {
        throw new BlockOptionError(
          'dir',
          'cannot read keys.psk',
          `Unable to access credentials ${file}: ${describe(e)}`,
        );
      }
      return p.value;
    }
    case 'tls-creds-x509':
      return p.value;
    case 'secret': {
      let text: Buffer;
      if (p.file !== undefined) {
        try {
          text = readFileSync(p.file);
        } catch (e) {
          throw new BlockOptionError(
            'file',
            'unreadable',
            `Unable to read ${p.file}: ${describe(e)}`,
          );
        }
      } else {
        text = Buffer.from(p.data ?? '', 'utf8');
      }
      const secret: Secret = {
        data: p.format === 'base64' ? decodeBase64(text.toString('latin1').trim()) : text,
      };
      return secret;
    }
  }
}

function describe(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return 'No such file or directory';
  if (code === 'EACCES') return 'Permission denied';
  return (e as Error).message;
}
