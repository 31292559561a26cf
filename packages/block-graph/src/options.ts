// blockdev-add options: checked against the common keys and the driver's schema before
// anything is opened, with errors that name the bad key by its dotted path, in QEMU's
// words where QEMU's QAPI layer has them (wrong type, missing, unexpected).

import type { BlockDriver } from './driver.ts';
import { BlockError, BlockErrorCode, BlockOptionError } from './errors.ts';
import {
  bool,
  checkNoOtherKeys,
  custom,
  enumOf,
  type Member,
  type OptionSyntax,
  object,
  opt,
  optionMissing,
  optionNotAccepted,
  optionTypeError,
  parseMembers,
  str,
  struct,
  type TypeInfo,
  union,
} from './schema.ts';

export type { OptionSyntax };

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

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

const detectZeroes = enumOf(['off', 'on', 'unmap']);

const NODE_NAME = /^[A-Za-z][A-Za-z0-9_.-]{0,30}$/;

/** A child: a node's options inline, or a node's name (QEMU's BlockdevRef, checked by checkOptions). */
const blockdevRef = custom('BlockdevRef', (v) => v);

/**
 * BlockdevOptions as query-qmp-schema describes it: a union on `driver` of the drivers
 * known, each with the common members, its children and its own options (what
 * checkOptions accepts).
 */
export function blockdevOptionsInfo(drivers: Iterable<BlockDriver>): TypeInfo {
  const common = {
    'node-name': opt(str),
    discard: opt(enumOf(['ignore', 'unmap'])),
    cache: opt(struct({ direct: opt(bool), 'no-flush': opt(bool) })),
    'read-only': opt(bool),
    'auto-read-only': opt(bool),
    'force-share': opt(bool),
    'detect-zeroes': opt(detectZeroes),
  };
  const variants: Record<string, Record<string, Member>> = {};
  for (const d of drivers) {
    const members: Record<string, Member> = {};
    for (const c of d.children ?? []) members[c.key] = c.required ? blockdevRef : opt(blockdevRef);
    variants[d.name] = { ...members, ...d.options };
  }
  return union('driver', common, variants).info;
}

export function checkNodeName(name: string, key = 'node-name'): void {
  if (!NODE_NAME.test(name)) {
    throw new BlockOptionError(
      key,
      `'${name}' is not a valid node name (a letter, then letters, digits, '-', '_' or '.', at most 31 characters)`,
    );
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
  const driverName = str.parse(raw.driver, key('driver'), syntax);
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
    spec.nodeName = str.parse(nodeName, key('node-name'), syntax);
    checkNodeName(spec.nodeName, key('node-name'));
  }
  const discard = raw.discard;
  if (discard !== undefined) {
    // QEMU's -drive spellings on/off are taken too.
    const d = str.parse(discard, key('discard'), syntax);
    if (d !== 'ignore' && d !== 'unmap' && d !== 'off' && d !== 'on') {
      throw optionNotAccepted(key('discard'), d);
    }
    spec.discard = d === 'unmap' || d === 'on' ? 'unmap' : 'ignore';
  }
  if (raw.cache !== undefined) {
    const given = object().parse(raw.cache, key('cache'), syntax);
    const cache = parseMembers(
      given,
      { direct: opt(bool), 'no-flush': opt(bool) },
      syntax,
      key('cache.'),
    );
    if (cache.direct !== undefined) spec.direct = cache.direct;
    if (cache['no-flush'] !== undefined) spec.noFlush = cache['no-flush'];
    checkNoOtherKeys(given, ['direct', 'no-flush'], key('cache.'));
  }
  const ro =
    raw['read-only'] === undefined
      ? undefined
      : bool.parse(raw['read-only'], key('read-only'), syntax);
  if (ro !== undefined) spec.readOnly = ro;
  if (raw['auto-read-only'] !== undefined) {
    spec.autoReadOnly = bool.parse(raw['auto-read-only'], key('auto-read-only'), syntax);
  }
  if (raw['force-share'] !== undefined) {
    spec.forceShare = bool.parse(raw['force-share'], key('force-share'), syntax);
  }
  if (driver.readOnlyOnly) {
    if (ro === false) {
      throw new BlockOptionError(key('read-only'), `driver '${driver.name}' can only be read-only`);
    }
    spec.readOnly = true;
  }
  if (raw['detect-zeroes'] !== undefined) {
    spec.detectZeroes = detectZeroes.parse(raw['detect-zeroes'], key('detect-zeroes'), syntax);
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
  spec.options = parseMembers(raw, driver.options ?? {}, syntax, path);
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
