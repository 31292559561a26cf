// The one option schema of vm-disk, QAPI-shaped: blockdev-add's driver options, the
// daemon's serve options (--nbd-server, --export, --object, --chardev, --monitor), QMP
// arguments and the object registry's objects are all declared with it. A definition
// checks a value and converts it, in one of two syntaxes as QEMU's QObject input visitor:
//
// - 'json' (QMP, and JSON on the command line) is typed: a boolean is true or false, an
//   integer a JSON number; "on" for a boolean is refused, as QEMU refuses it;
// - 'keyval' (the command line's KEY=VALUE,...) gives strings, converted as QEMU's keyval
//   visitor converts them: booleans on/yes/true/y and off/no/false/n, decimal integers,
//   sizes with suffixes (512k, 1G).
//
// Members are checked in the definition's order, unknown ones last; the first problem is
// reported with the key's dotted path in QEMU's words (the formatters below, the only place
// those words are spelled). A definition's TypeScript type is inferred (Infer<typeof x>),
// and it keeps its QAPI shape (`info`) for query-qmp-schema.

import { BlockOptionError } from './errors.ts';

/**
 * How option values are typed, as in QEMU's QObject input visitor: 'json' (QMP, and JSON
 * on the command line) is typed; 'keyval' (the command line's KEY=VALUE,... syntax) gives
 * strings, which the schema converts. One schema serves both.
 */
export type OptionSyntax = 'json' | 'keyval';

// ---------------------------------------------------------------- QEMU's words

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
export function optionNotAccepted(key: string, value: string, named = key): BlockOptionError {
  return new BlockOptionError(
    key,
    `does not accept value '${value}'`,
    `Parameter '${named}' does not accept value '${value}'`,
  );
}

// ---------------------------------------------------------------- definitions

/** The QAPI shape of a definition, as query-qmp-schema's SchemaInfo will describe it. */
export type TypeInfo =
  | { meta: 'builtin'; name: 'str' | 'bool' | 'int' | 'uint32' | 'uint64' | 'size' | 'any' }
  | { meta: 'enum'; values: readonly string[] }
  | { meta: 'array'; element: TypeInfo }
  | {
      meta: 'object';
      members: readonly MemberInfo[];
      tag?: string;
      variants?: Readonly<Record<string, readonly MemberInfo[]>>;
    }
  /** Checked by code of its own (a value QAPI would describe by a name of its own). */
  | { meta: 'custom'; name: string };

export interface MemberInfo {
  name: string;
  type: TypeInfo;
  optional: boolean;
}

/** A definition: checks and converts a value found at `key` (its dotted path). */
export interface Type<T> {
  readonly info: TypeInfo;
  /** Throws BlockOptionError in QEMU's words. */
  parse(value: unknown, key: string, syntax: OptionSyntax): T;
}

/** An optional member (QAPI's '*name'); with a default, the member is always present after parsing. */
export interface Optional<T, D> {
  readonly optional: true;
  readonly type: Type<T>;
  readonly default: D;
}

export type Member = Type<unknown> | Optional<unknown, unknown>;
export type Members = Readonly<Record<string, Member>>;

type Simplify<T> = { [K in keyof T]: T[K] } & {};

/** The TypeScript type of a definition (Infer<typeof exportOptions>). */
export type Infer<S> = S extends Type<infer T> ? T : S extends Members ? InferMembers<S> : never;

/** The object type `members` parse to (optional members without a default may be absent). */
export type InferMembers<M> = string extends keyof M
  ? // Members named at run time (throttle's limits): each may be absent.
    Partial<Record<string, InferMember<M[string]>>>
  : Simplify<
      {
        -readonly [K in keyof M as M[K] extends Optional<unknown, undefined>
          ? never
          : K]: M[K] extends Type<infer T>
          ? T
          : M[K] extends Optional<infer T, unknown>
            ? T
            : never;
      } & {
        -readonly [K in keyof M as M[K] extends Optional<unknown, undefined>
          ? K
          : never]?: M[K] extends Optional<infer T, unknown> ? T : never;
      }
    >;

type InferMember<T> =
  T extends Optional<infer U, unknown> ? U : T extends Type<infer U> ? U : unknown;

/** Marks a member optional; with `dflt`, an absent member takes that value. */
export function opt<T>(type: Type<T>): Optional<T, undefined>;
export function opt<T>(type: Type<T>, dflt: T): Optional<T, T>;
export function opt<T>(type: Type<T>, dflt?: T): Optional<T, T | undefined> {
  return { optional: true, type, default: dflt };
}

function isOptional(m: Member): m is Optional<unknown, unknown> {
  return 'optional' in m;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

// ---------------------------------------------------------------- built-in types

/** str: a string in both syntaxes. */
export const str: Type<string> = {
  info: { meta: 'builtin', name: 'str' },
  parse(value, key) {
    if (typeof value !== 'string') throw optionTypeError(key, 'string');
    return value;
  },
};

// QEMU's qapi_bool_parse(): exactly these spellings, lower case.
const TRUE = new Set(['on', 'yes', 'true', 'y']);
const FALSE = new Set(['off', 'no', 'false', 'n']);

/** bool: JSON true/false; keyval on/yes/true/y or off/no/false/n, as QEMU parses them. */
export const bool: Type<boolean> = {
  info: { meta: 'builtin', name: 'bool' },
  parse(value, key, syntax) {
    if (typeof value === 'boolean') return value;
    if (syntax === 'keyval' && typeof value === 'string') {
      if (TRUE.has(value)) return true;
      if (FALSE.has(value)) return false;
      throw optionExpects(key, "'on' or 'off'");
    }
    throw optionTypeError(key, 'boolean');
  },
};

/** int: a signed integer (JSON integer, keyval decimal), optionally within [min, max]. */
export function int(range: { min?: number; max?: number } = {}): Type<number> {
  const { min, max } = range;
  return {
    info: { meta: 'builtin', name: 'int' },
    parse(value, key, syntax) {
      let n = value;
      if (syntax === 'keyval' && typeof n === 'string') {
        n = /^-?\d+$/.test(n) ? Number(n) : Number.NaN;
        if (!Number.isSafeInteger(n)) throw optionExpects(key, 'integer');
      }
      if (typeof n !== 'number' || !Number.isSafeInteger(n)) throw optionTypeError(key, 'integer');
      if (min !== undefined && n < min) throw new BlockOptionError(key, `${n} is less than ${min}`);
      if (max !== undefined && n > max) throw new BlockOptionError(key, `${n} is more than ${max}`);
      return n;
    },
  };
}

function uint(bits: 32 | 64): Type<number> {
  return {
    info: { meta: 'builtin', name: bits === 32 ? 'uint32' : 'uint64' },
    parse(value, key, syntax) {
      let n = value;
      if (syntax === 'keyval' && typeof n === 'string') {
        if (!/^\d+$/.test(n)) {
          throw optionExpects(key, n.startsWith('-') ? `uint${bits}_t` : 'integer');
        }
        n = Number(n);
      }
      if (typeof n !== 'number' || !Number.isInteger(n)) throw optionExpects(key, 'uint64');
      if (n < 0 || n > 2 ** bits - 1 || !Number.isSafeInteger(n)) {
        throw optionExpects(key, bits === 64 ? 'uint64' : `uint${bits}_t`);
      }
      return n;
    },
  };
}

/** uint32 and uint64 (QEMU's words differ per syntax, as its visitors' do). */
export const uint32: Type<number> = uint(32);
export const uint64: Type<number> = uint(64);

const SIZE_SUFFIX: Record<string, number> = {
  '': 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/** A size with an optional suffix (qemu-img's 1G, 512k, 4096), or undefined. */
export function parseSize(text: string): number | undefined {
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*([bkmgtpeBKMGTPE]?)\s*$/.exec(text);
  if (!m) return undefined;
  const value = Number(m[1]) * (SIZE_SUFFIX[(m[2] ?? '').toLowerCase()] ?? 1);
  return Number.isSafeInteger(value) ? value : undefined;
}

/** size: bytes; a JSON uint64, or keyval with qemu-img's suffixes (512M, 1G). */
export const size: Type<number> = {
  info: { meta: 'builtin', name: 'size' },
  parse(value, key, syntax) {
    if (syntax === 'json' || typeof value !== 'string') return uint64.parse(value, key, syntax);
    const n = parseSize(value);
    if (n === undefined) throw optionExpects(key, 'size');
    return n;
  },
};

/** any: whatever JSON value (the consumer checks it). */
export const any: Type<unknown> = {
  info: { meta: 'builtin', name: 'any' },
  parse: (value) => value,
};

/** The member a key names: 'file.inject-error[0].event' -> 'event'. */
function memberName(key: string): string {
  const last = key.slice(key.lastIndexOf('.') + 1);
  return last.replace(/(\[\d+\])+$/, '');
}

/** An enum: a string that is one of `values`. */
export function enumOf<const V extends readonly string[]>(values: V): Type<V[number]> {
  return {
    info: { meta: 'enum', values },
    parse(value, key) {
      const s = str.parse(value, key, 'json');
      // QEMU's message names the member alone (its visitor's name); `key` keeps the path.
      if (!values.includes(s)) throw optionNotAccepted(key, s, memberName(key));
      return s;
    },
  };
}

/** A list; keyval's lists may also come as the object it makes of them ({"0": a, "1": b}). */
export function list<T>(element: Type<T>): Type<T[]> {
  return {
    info: { meta: 'array', element: element.info },
    parse(value, key, syntax) {
      let items: unknown[] | undefined;
      if (Array.isArray(value)) items = value;
      else if (syntax === 'keyval' && isObject(value)) {
        const keys = Object.keys(value);
        if (keys.every((k, i) => k === String(i))) items = keys.map((k) => value[k]);
      }
      if (!items) throw optionTypeError(key, 'array');
      return items.map((v, i) => element.parse(v, `${key}[${i}]`, syntax));
    },
  };
}

/** A value checked by code of its own; `name` is what QEMU's schema calls its type. */
export function custom<T>(
  name: string,
  parse: (value: unknown, key: string, syntax: OptionSyntax) => T,
): Type<T> {
  return { info: { meta: 'custom', name }, parse };
}

/** An object (a JSON object whose members the consumer checks); `name` is used in errors. */
export function object(name = 'object'): Type<Record<string, unknown>> {
  return custom(name, (value, key) => {
    if (!isObject(value)) throw optionTypeError(key, name);
    return value;
  });
}

// ---------------------------------------------------------------- structs and unions

function membersInfo(members: Members): MemberInfo[] {
  // Members named '=...' are QEMU's hidden options (rbd's =keyvalue-pairs): not in its schema.
  return Object.entries(members)
    .filter(([name]) => !name.startsWith('='))
    .map(([name, m]) => ({
      name,
      type: isOptional(m) ? m.type.info : m.info,
      optional: isOptional(m),
    }));
}

/**
 * Checks and converts the members `members` names, in order; other members of `value` are
 * left alone (checkNoOtherKeys refuses them, last). `prefix` is the path of `value` ('' at
 * the top, 'addr.' below).
 */
export function parseMembers<M extends Members>(
  value: Record<string, unknown>,
  members: M,
  syntax: OptionSyntax,
  prefix = '',
): InferMembers<M> {
  const out: Record<string, unknown> = {};
  for (const [key, m] of Object.entries(members)) {
    const v = value[key];
    if (v === undefined) {
      if (!isOptional(m)) throw optionMissing(`${prefix}${key}`);
      if (m.default !== undefined) out[key] = m.default;
      continue;
    }
    out[key] = (isOptional(m) ? m.type : m).parse(v, `${prefix}${key}`, syntax);
  }
  return out as InferMembers<M>;
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

function objectAt(value: unknown, key: string, name: string): Record<string, unknown> {
  if (!isObject(value)) throw optionTypeError(key || '(options)', name);
  return value;
}

export interface StructType<M extends Members> extends Type<InferMembers<M>> {
  readonly members: M;
}

/** A QAPI struct: `members` in order, nothing else. `name` names it in type errors. */
export function struct<const M extends Members>(members: M, name = 'object'): StructType<M> {
  return {
    members,
    info: { meta: 'object', members: membersInfo(members) },
    parse(value, key, syntax) {
      const o = objectAt(value, key, name);
      const prefix = key ? `${key}.` : '';
      const out = parseMembers(o, members, syntax, prefix);
      checkNoOtherKeys(o, Object.keys(members), prefix);
      return out;
    },
  };
}

type UnionOf<Tag extends string, B extends Members, V extends Readonly<Record<string, Members>>> = {
  [K in keyof V & string]: Simplify<{ [P in Tag]: K } & InferMembers<B> & InferMembers<V[K]>>;
}[keyof V & string];

/**
 * A flat QAPI union: the `tag` member (an enum of the variants' names) first, then the
 * members of `base`, then those of the variant the tag names; nothing else.
 */
export function union<
  const Tag extends string,
  const B extends Members,
  const V extends Readonly<Record<string, Members>>,
>(tag: Tag, base: B, variants: V, name = 'object'): Type<UnionOf<Tag, B, V>> {
  const tagType = enumOf(Object.keys(variants));
  return {
    info: {
      meta: 'object',
      members: [{ name: tag, type: tagType.info, optional: false }, ...membersInfo(base)],
      tag,
      variants: Object.fromEntries(Object.entries(variants).map(([k, m]) => [k, membersInfo(m)])),
    },
    parse(value, key, syntax) {
      const o = objectAt(value, key, name);
      const prefix = key ? `${key}.` : '';
      if (o[tag] === undefined) throw optionMissing(`${prefix}${tag}`);
      const t = tagType.parse(o[tag], `${prefix}${tag}`, syntax);
      const variant = variants[t] ?? {};
      const out = {
        [tag]: t,
        ...parseMembers(o, base, syntax, prefix),
        ...parseMembers(o, variant, syntax, prefix),
      };
      checkNoOtherKeys(o, [tag, ...Object.keys(base), ...Object.keys(variant)], prefix);
      return out as UnionOf<Tag, B, V>;
    },
  };
}
