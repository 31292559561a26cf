// A small QAPI-like checker for the option structures vm-disk accepts (qemu-storage-
// daemon's --nbd-server, --export, --object, --chardev, --monitor; QMP arguments). One
// schema, two syntaxes, as QEMU's QObject input visitor: JSON values (QMP, JSON on the
// command line) must have the schema's types; keyval strings (KEY=VALUE,... on the
// command line) are converted ("on"/"off" booleans, decimal integers). Members are checked
// in the schema's order, unknown ones last; the first problem is reported with the key's
// full path in QEMU's words, by @vmdisk/block-graph's option checkers, which blockdev-add
// uses too.
import {
  checkNoOtherKeys,
  keyBool,
  keyEnum,
  keyInt,
  keyList,
  keyObject,
  keyString,
  keyUint,
  type OptionSyntax,
  optionExpects,
  optionMissing,
} from '@vmdisk/block-graph';

export type { OptionSyntax };

export type FieldType =
  | 'str'
  | 'bool'
  | 'int'
  | 'uint32'
  | 'uint64'
  /** QAPI's size: bytes; keyval also takes qemu-img's suffixes (512M, 1G). */
  | 'size'
  | 'any'
  /** A JSON object whose members the command checks itself. */
  | 'object'
  | { enum: readonly string[] }
  | { struct: Schema }
  /**
   * A QAPI union: the members of `base` (among them the `tag`, an enum of the variants'
   * names), then those of the variant the tag names.
   */
  | { union: { base: Schema; tag: string; variants: Record<string, Schema> } }
  | { list: FieldType };

export interface Field {
  type: FieldType;
  required?: boolean;
}
export type Schema = Record<string, Field>;

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

/** A size with an optional suffix (qemu-img's 1G, 512k, 4096). */
export function parseSize(text: string): number | undefined {
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*([bkmgtpeBKMGTPE]?)\s*$/.exec(text);
  if (!m) return undefined;
  const value = Number(m[1]) * (SIZE_SUFFIX[(m[2] ?? '').toLowerCase()] ?? 1);
  return Number.isSafeInteger(value) ? value : undefined;
}

function convert(value: unknown, type: FieldType, key: string, syntax: OptionSyntax): unknown {
  switch (type) {
    case 'any':
      return value;
    case 'object':
      return keyObject(value, key);
    case 'str':
      return keyString(value, key);
    case 'bool':
      return keyBool(value, key, syntax);
    case 'int':
      return keyInt(value, key, syntax);
    case 'uint32':
      return keyUint(value, key, syntax, 32);
    case 'uint64':
      return keyUint(value, key, syntax, 64);
    case 'size': {
      if (syntax === 'json' || typeof value !== 'string') return keyUint(value, key, syntax, 64);
      const size = parseSize(value);
      if (size === undefined) throw optionExpects(key, 'a size value');
      return size;
    }
  }
  if ('enum' in type) return keyEnum(value, key, type.enum);
  if ('list' in type) {
    return keyList(value, key, syntax).map((v, i) => convert(v, type.list, `${key}[${i}]`, syntax));
  }
  const members = keyObject(value, key);
  if ('struct' in type) return checkStruct(members, type.struct, syntax, `${key}.`);
  const { base, tag, variants } = type.union;
  const out = checkMembers(members, base, syntax, `${key}.`);
  const variant = variants[out[tag] as string] ?? {};
  Object.assign(out, checkMembers(members, variant, syntax, `${key}.`));
  checkNoOtherKeys(members, [...Object.keys(base), ...Object.keys(variant)], `${key}.`);
  return out;
}

/** Checks and converts the members `schema` names, in its order (others are left alone). */
function checkMembers(
  value: Record<string, unknown>,
  schema: Schema,
  syntax: OptionSyntax,
  prefix: string,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, field] of Object.entries(schema)) {
    if (value[key] === undefined) {
      if (field.required) throw optionMissing(`${prefix}${key}`);
      continue;
    }
    out[key] = convert(value[key], field.type, `${prefix}${key}`, syntax);
  }
  return out;
}

/**
 * Checks `value` against `schema` in `syntax`; returns a copy with converted values.
 * Throws @vmdisk/block-graph's BlockOptionError (code ERR_VMDISK_BLOCK_BAD_OPTION).
 */
export function checkStruct(
  value: Record<string, unknown>,
  schema: Schema,
  syntax: OptionSyntax,
  prefix = '',
): Record<string, unknown> {
  const out = checkMembers(value, schema, syntax, prefix);
  checkNoOtherKeys(value, Object.keys(schema), prefix);
  return out;
}
