// blockdev-add options: checked against the common keys and the driver's schema before
// anything is opened, with errors that name the bad key by its dotted path.

import type { BlockDriver, OptionSpec } from './driver.ts';
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

/** An integer, or the decimal string of one (keyval); checked against min and max. */
export function keyInt(value: unknown, key: string, min?: number, max?: number): number {
  let n = value;
  if (typeof n === 'string' && /^-?\d+$/.test(n.trim())) n = Number(n.trim());
  if (typeof n !== 'number' || !Number.isSafeInteger(n)) {
    throw new BlockOptionError(key, 'expected an integer');
  }
  if (min !== undefined && n < min) throw new BlockOptionError(key, `${n} is less than ${min}`);
  if (max !== undefined && n > max) throw new BlockOptionError(key, `${n} is more than ${max}`);
  return n;
}

/** A boolean, or on/off, true/false, yes/no (keyval). */
export function keyBool(value: unknown, key: string): boolean {
  if (typeof value === 'boolean') return value;
  if (value === 'on' || value === 'true' || value === 'yes') return true;
  if (value === 'off' || value === 'false' || value === 'no') return false;
  throw new BlockOptionError(key, 'expected a boolean');
}

/** A list, or the object keyval makes of one ({"0": a, "1": b}). */
export function keyList(value: unknown, key: string): unknown[] {
  if (Array.isArray(value)) return value;
  if (isObject(value)) {
    const keys = Object.keys(value);
    if (keys.every((k, i) => k === String(i))) return keys.map((k) => value[k]);
  }
  throw new BlockOptionError(key, 'expected a list');
}

function checkValue(spec: OptionSpec, value: unknown, key: string): unknown {
  switch (spec.type) {
    case 'string':
      if (typeof value !== 'string') throw new BlockOptionError(key, 'expected a string');
      if (spec.values && !spec.values.includes(value)) {
        throw new BlockOptionError(key, `'${value}' is not one of ${spec.values.join(', ')}`);
      }
      return value;
    case 'int':
      return keyInt(value, key, spec.min, spec.max);
    case 'bool':
      return keyBool(value, key);
    case 'json':
      return spec.parse(value, key);
  }
}

/** Checks blockdev-add options (and inline children) against the drivers known. */
export function checkOptions(
  raw: unknown,
  drivers: ReadonlyMap<string, BlockDriver>,
  path = '',
): NodeSpec {
  if (!isObject(raw))
    throw new BlockOptionError(path.replace(/\.$/, '') || '(options)', 'expected an object');
  const key = (k: string) => `${path}${k}`;
  const driverName = raw.driver;
  if (driverName === undefined) throw new BlockOptionError(key('driver'), 'missing');
  if (typeof driverName !== 'string')
    throw new BlockOptionError(key('driver'), 'expected a string');
  const driver = drivers.get(driverName);
  if (!driver) {
    const err = new BlockError(
      BlockErrorCode.UNKNOWN_DRIVER,
      `Invalid option '${key('driver')}': unknown driver '${driverName}' (known: ${[...drivers.keys()].join(', ')})`,
    );
    throw Object.assign(err, { key: key('driver') });
  }
  const spec: NodeSpec = { driver, options: {}, children: {}, path, raw };
  const nodeName = raw['node-name'];
  if (nodeName !== undefined) {
    if (typeof nodeName !== 'string')
      throw new BlockOptionError(key('node-name'), 'expected a string');
    checkNodeName(nodeName, key('node-name'));
    spec.nodeName = nodeName;
  }
  const ro =
    raw['read-only'] === undefined ? undefined : keyBool(raw['read-only'], key('read-only'));
  if (ro !== undefined) spec.readOnly = ro;
  if (raw['auto-read-only'] !== undefined) {
    spec.autoReadOnly = keyBool(raw['auto-read-only'], key('auto-read-only'));
  }
  if (raw['force-share'] !== undefined) {
    spec.forceShare = keyBool(raw['force-share'], key('force-share'));
  }
  if (driver.readOnlyOnly) {
    if (ro === false) {
      throw new BlockOptionError(key('read-only'), `driver '${driver.name}' can only be read-only`);
    }
    spec.readOnly = true;
  }
  const cache = raw.cache;
  if (cache !== undefined) {
    if (!isObject(cache)) throw new BlockOptionError(key('cache'), 'expected an object');
    for (const [k, v] of Object.entries(cache)) {
      if (k !== 'direct' && k !== 'no-flush')
        throw new BlockOptionError(key(`cache.${k}`), 'unknown key');
      const b = keyBool(v, key(`cache.${k}`));
      if (k === 'direct') spec.direct = b;
      else spec.noFlush = b;
    }
  }
  const discard = raw.discard;
  if (discard !== undefined) {
    if (discard !== 'ignore' && discard !== 'unmap' && discard !== 'off' && discard !== 'on') {
      throw new BlockOptionError(
        key('discard'),
        `'${String(discard)}' is not one of ignore, unmap`,
      );
    }
    spec.discard = discard === 'unmap' || discard === 'on' ? 'unmap' : 'ignore';
  }
  const dz = raw['detect-zeroes'];
  if (dz !== undefined) {
    if (dz !== 'off' && dz !== 'on' && dz !== 'unmap') {
      throw new BlockOptionError(
        key('detect-zeroes'),
        `'${String(dz)}' is not one of off, on, unmap`,
      );
    }
    spec.detectZeroes = dz;
  }
  const childKeys = new Map((driver.children ?? []).map((c) => [c.key, c]));
  for (const [k, v] of Object.entries(raw)) {
    if (COMMON.has(k)) continue;
    const child = childKeys.get(k);
    if (child) {
      if (v === null) {
        if (!child.nullable) throw new BlockOptionError(key(k), 'may not be null');
        spec.children[k] = null;
      } else if (typeof v === 'string') {
        checkNodeName(v, key(k));
        spec.children[k] = v;
      } else if (isObject(v)) {
        spec.children[k] = checkOptions(v, drivers, `${key(k)}.`);
      } else {
        throw new BlockOptionError(key(k), 'expected a node name or an object of options');
      }
      continue;
    }
    const opt = driver.options[k];
    if (!opt) throw new BlockOptionError(key(k), `unknown key for driver '${driver.name}'`);
    spec.options[k] = checkValue(opt, v, key(k));
  }
  for (const [k, opt] of Object.entries(driver.options)) {
    if (opt.required && spec.options[k] === undefined)
      throw new BlockOptionError(key(k), 'missing');
  }
  for (const c of driver.children ?? []) {
    if (c.required && spec.children[c.key] === undefined)
      throw new BlockOptionError(key(c.key), 'missing');
  }
  if (driver.validate) {
    try {
      driver.validate(spec.options);
    } catch (err) {
      if (err instanceof BlockOptionError && path)
        throw new BlockOptionError(
          key(err.key),
          err.message.replace(/^Invalid option '[^']*': /, ''),
        );
      throw err;
    }
  }
  return spec;
}
