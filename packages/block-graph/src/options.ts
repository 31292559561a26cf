// blockdev-add options: checked against the common keys and the driver's schema before
// anything is opened, with errors that name the bad key by its dotted path, in QEMU's
// words where QEMU's QAPI layer has them (wrong type, missing, unexpected).

import type { BlockDriver, OptionSpec, OptionSyntax } from './driver.ts';
import { BlockError, BlockErrorCode, BlockOptionError } from './errors.ts';

/** blockdev-add-shaped options: `driver`, `node-name`, driver keys, children inline or by name. */
export type BlockdevOptions = { driver: string; 'node-name'?: string } & Record<string, unknown>;

/** A checked node description (children checked too). */
export interface NodeSpec {
  driver: BlockDriver;
  nodeName?: string;
  readOnly?: boolean;
  autoReadOnly?: boolean;
  forceShare?: boolean;
  direct?: boolean;
  noFlush?: boolean;
  discard?: 'ignore' | 'unmap';
  detectZeroes?: 'off' | 'on' | 'unmap';
  /** The driver's own keys. */
  options: Record<string, unknown>;
  /** Children by key: a node name, an inline spec, or null (no child). */
  children: Record<string, string | NodeSpec | null>;
  /** The path of this node's options ('' at the top, 'file.' below). */
  path: string;
  raw: Record<string, unknown>;
}

const COMMON = new Set([
  'driver',
  'node-name',
  'read-only',
  'auto-read-only',
  'force-share',
  'cache',
  'discard',
  'detect-zeroes',
]);

const DETECT_ZEROES = ['off', 'on', 'unmap'] as const;

const NODE_NAME = /^[A-Za-z][A-Za-z0-9_.-]{0,30}$/;

export function checkNodeName(name: string, key = 'node-name'): void {
  if (!NODE_NAME.test(name)) {
    throw new BlockOptionError(
      key,
      `'${name}' is not a valid node name (a letter, then letters, digits, '-', '_' or '.', at most 31 characters)`,
    );
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

// ---------------------------------------------------------------- syntaxes and QEMU's words

// OptionSyntax is declared in driver.ts (drivers' option parsers take it).
export type { OptionSyntax };

/** QEMU's "Invalid parameter type for 'KEY', expected: TYPE" (a JSON value of the wrong type). */
export function optionTypeError(key: string, expected: string): BlockOptionError {
  return new BlockOptionError(
    key,
    `expected ${expected}`,
    `Invalid parameter type for '${key}', expected: ${expected}`,
  );
}

/** QEMU's "Parameter 'KEY' is missing". */
export function optionMissing(key: string): BlockOptionError {
  return new BlockOptionError(key, 'missing', `Parameter '${key}' is missing`);
}

/** QEMU's "Parameter 'KEY' is unexpected" (a member the schema does not have). */
export function optionUnexpected(key: string): BlockOptionError {
  return new BlockOptionError(key, 'unexpected', `Parameter '${key}' is unexpected`);
}

/** QEMU's "Parameter 'KEY' expects WHAT" (a value that does not convert or fit). */
export function optionExpects(key: string, what: string): BlockOptionError {
  return new BlockOptionError(key, `expects ${what}`, `Parameter '${key}' expects ${what}`);
}

/** QEMU's "Parameter 'KEY' does not accept value 'VALUE'" (not one of an enum's values). */
export function optionNotAccepted(key: string, value: string): BlockOptionError {
  return new BlockOptionError(
    key,
    `does not accept value '${value}'`,
    `Parameter '${key}' does not accept value '${value}'`,
  );
}

const TRUE = new Set(['on', 'yes', 'true', 'y']);
const FALSE = new Set(['off', 'no', 'false', 'n']);

/** A string (the same in both syntaxes). */
export function keyString(value: unknown, key: string): string {
  if (typeof value !== 'string') throw optionTypeError(key, 'string');
  return value;
}

/** A string that is one of `values` (a QAPI enum). */
export function keyEnum<T extends string>(value: unknown, key: string, values: readonly T[]): T {
  const s = keyString(value, key);
  if (!values.includes(s as T)) throw optionNotAccepted(key, s);
  return s as T;
}

/** A boolean: JSON true/false; keyval on/off (yes/no, true/false, y/n) as QEMU parses them. */
export function keyBool(value: unknown, key: string, syntax: OptionSyntax): boolean {
  if (typeof value === 'boolean') return value;
  if (syntax === 'keyval' && typeof value === 'string') {
    if (TRUE.has(value)) return true;
    if (FALSE.has(value)) return false;
    throw optionExpects(key, "'on' or 'off'");
  }
  throw optionTypeError(key, 'boolean');
}

/** A signed integer (QAPI int): a JSON integer, or keyval decimal; then min and max. */
export function keyInt(
  value: unknown,
  key: string,
  syntax: OptionSyntax,
  min?: number,
  max?: number,
): number {
  let n = value;
  if (syntax === 'keyval' && typeof n === 'string') {
    n = /^-?\d+$/.test(n) ? Number(n) : Number.NaN;
    if (!Number.isSafeInteger(n)) throw optionExpects(key, 'integer');
  }
  if (typeof n !== 'number' || !Number.isSafeInteger(n)) throw optionTypeError(key, 'integer');
  if (min !== undefined && n < min) throw new BlockOptionError(key, `${n} is less than ${min}`);
  if (max !== undefined && n > max) throw new BlockOptionError(key, `${n} is more than ${max}`);
  return n;
}

/** An unsigned integer (QAPI uint32, uint64), with QEMU's words for each syntax. */
export function keyUint(
  value: unknown,
  key: string,
  syntax: OptionSyntax,
  bits: 32 | 64 = 64,
): number {
  let n = value;
  if (syntax === 'keyval' && typeof n === 'string') {
    if (!/^\d+$/.test(n)) throw optionExpects(key, n.startsWith('-') ? `uint${bits}_t` : 'integer');
    n = Number(n);
  }
  if (typeof n !== 'number' || !Number.isInteger(n)) throw optionExpects(key, 'uint64');
  if (n < 0 || n > 2 ** bits - 1 || !Number.isSafeInteger(n)) {
    throw optionExpects(key, bits === 64 ? 'uint64' : `uint${bits}_t`);
  }
  return n;
}

/** An object (a QAPI struct): `expected` names its type in the error. */
export function keyObject(
  value: unknown,
  key: string,
  expected = 'object',
): Record<string, unknown> {
  if (!isObject(value)) throw optionTypeError(key, expected);
  return value;
}

/** A list; keyval's lists may also come as the object it makes of them ({"0": a, "1": b}). */
export function keyList(value: unknown, key: string, syntax: OptionSyntax): unknown[] {
  if (Array.isArray(value)) return value;
  if (syntax === 'keyval' && isObject(value)) {
    const keys = Object.keys(value);
    if (keys.every((k, i) => k === String(i))) return keys.map((k) => value[k]);
  }
  throw optionTypeError(key, 'array');
}

/** Refuses the first member of `value` that is not one of `known` (QEMU checks them last). */
export function checkNoOtherKeys(
  value: Record<string, unknown>,
  known: Iterable<string>,
  prefix: string,
): void {
  const set = new Set(known);
  for (const k of Object.keys(value)) if (!set.has(k)) throw optionUnexpected(`${prefix}${k}`);
}

function checkValue(spec: OptionSpec, value: unknown, key: string, syntax: OptionSyntax): unknown {
  switch (spec.type) {
    case 'string':
      return spec.values ? keyEnum(value, key, spec.values) : keyString(value, key);
    case 'int':
      return keyInt(value, key, syntax, spec.min, spec.max);
    case 'bool':
      return keyBool(value, key, syntax);
    case 'json':
      return spec.parse(value, key, syntax);
  }
}

/**
 * Checks blockdev-add options (and inline children) against the drivers known, in QEMU's
 * order: the common members (driver first), then the driver's children and options, each
 * missing or of the wrong type as it comes; members nobody knows last.
 */
export function checkOptions(
  raw: unknown,
  drivers: ReadonlyMap<string, BlockDriver>,
  path = '',
  syntax: OptionSyntax = 'json',
): NodeSpec {
  if (!isObject(raw)) throw optionTypeError(path.replace(/\.$/, '') || '(options)', 'object');
  const key = (k: string) => `${path}${k}`;
  if (raw.driver === undefined) throw optionMissing(key('driver'));
  const driverName = keyString(raw.driver, key('driver'));
  const driver = drivers.get(driverName);
  if (!driver) {
    const err = new BlockError(
      BlockErrorCode.UNKNOWN_DRIVER,
      `Parameter '${key('driver')}' does not accept value '${driverName}'`,
    );
    throw Object.assign(err, { key: key('driver') });
  }
  const spec: NodeSpec = { driver, options: {}, children: {}, path, raw };
  const nodeName = raw['node-name'];
  if (nodeName !== undefined) {
    checkNodeName(keyString(nodeName, key('node-name')), key('node-name'));
    spec.nodeName = nodeName as string;
  }
  const discard = raw.discard;
  if (discard !== undefined) {
    // QEMU's -drive spellings on/off are taken too.
    const d = keyString(discard, key('discard'));
    if (d !== 'ignore' && d !== 'unmap' && d !== 'off' && d !== 'on') {
      throw optionNotAccepted(key('discard'), d);
    }
    spec.discard = d === 'unmap' || d === 'on' ? 'unmap' : 'ignore';
  }
  if (raw.cache !== undefined) {
    const cache = keyObject(raw.cache, key('cache'));
    if (cache.direct !== undefined)
      spec.direct = keyBool(cache.direct, key('cache.direct'), syntax);
    if (cache['no-flush'] !== undefined) {
      spec.noFlush = keyBool(cache['no-flush'], key('cache.no-flush'), syntax);
    }
    checkNoOtherKeys(cache, ['direct', 'no-flush'], key('cache.'));
  }
  const ro =
    raw['read-only'] === undefined
      ? undefined
      : keyBool(raw['read-only'], key('read-only'), syntax);
  if (ro !== undefined) spec.readOnly = ro;
  if (raw['auto-read-only'] !== undefined) {
    spec.autoReadOnly = keyBool(raw['auto-read-only'], key('auto-read-only'), syntax);
  }
  if (raw['force-share'] !== undefined) {
    spec.forceShare = keyBool(raw['force-share'], key('force-share'), syntax);
  }
  if (driver.readOnlyOnly) {
    if (ro === false) {
      throw new BlockOptionError(key('read-only'), `driver '${driver.name}' can only be read-only`);
    }
    spec.readOnly = true;
  }
  if (raw['detect-zeroes'] !== undefined) {
    spec.detectZeroes = keyEnum(raw['detect-zeroes'], key('detect-zeroes'), DETECT_ZEROES);
  }
  for (const c of driver.children ?? []) {
    const v = raw[c.key];
    if (v === undefined) {
      if (c.required) throw optionMissing(key(c.key));
    } else if (v === null && c.nullable) {
      spec.children[c.key] = null;
    } else if (typeof v === 'string') {
      checkNodeName(v, key(c.key));
      spec.children[c.key] = v;
    } else if (isObject(v)) {
      spec.children[c.key] = checkOptions(v, drivers, `${key(c.key)}.`, syntax);
    } else {
      throw optionTypeError(key(c.key), c.nullable ? 'BlockdevRefOrNull' : 'BlockdevRef');
    }
  }
  for (const [k, opt] of Object.entries(driver.options ?? {})) {
    const v = raw[k];
    if (v === undefined) {
      if (opt.required) throw optionMissing(key(k));
      continue;
    }
    spec.options[k] = checkValue(opt, v, key(k), syntax);
  }
  checkNoOtherKeys(
    raw,
    [...COMMON, ...(driver.children ?? []).map((c) => c.key), ...Object.keys(driver.options ?? {})],
    path,
  );
  if (driver.validate) {
    try {
      driver.validate(spec.options);
    } catch (err) {
      if (err instanceof BlockOptionError && path) {
        const plain = `Invalid option '${err.key}': `;
        throw err.message.startsWith(plain)
          ? new BlockOptionError(key(err.key), err.message.slice(plain.length))
          : new BlockOptionError(
              key(err.key),
              err.message,
              err.message.replace(`'${err.key}'`, `'${key(err.key)}'`),
            );
      }
      throw err;
    }
  }
  return spec;
}
