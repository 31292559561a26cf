// A small QAPI-like checker for the option structures vm-disk accepts (qemu-storage-
// daemon's --nbd-server, --export, --object, --chardev, --monitor; QMP arguments). It
// takes JSON values or keyval strings, converting strings to the expected type as QEMU's
// keyval input visitor does ("on"/"off" booleans, integers, sizes with suffixes), and
// reports the first problem with the key's full path, in QEMU's words.

export type FieldType =
  | 'str'
  | 'bool'
  | 'int'
  | 'size'
  | 'any'
  | { enum: readonly string[] }
  | { struct: Schema }
  | { list: FieldType };

export interface Field {
  type: FieldType;
  required?: boolean;
}
export type Schema = Record<string, Field>;

export class SchemaError extends Error {
  override name = 'SchemaError';
}

const TRUE = new Set(['on', 'yes', 'true', 'y']);
const FALSE = new Set(['off', 'no', 'false', 'n']);
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

function typeName(type: FieldType): string {
  if (typeof type === 'string')
    return type === 'str'
      ? 'string'
      : type === 'bool'
        ? 'boolean'
        : type === 'any'
          ? 'any'
          : 'integer';
  if ('enum' in type) return 'enum';
  if ('struct' in type) return 'object';
  return 'array';
}

function invalidType(path: string, type: FieldType): never {
  throw new SchemaError(`Invalid parameter type for '${path}', expected: ${typeName(type)}`);
}

export function parseSize(text: string): number | undefined {
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*([bkmgtpeBKMGTPE]?)\s*$/.exec(text);
  if (!m) return undefined;
  const value = Number(m[1]) * (SIZE_SUFFIX[(m[2] ?? '').toLowerCase()] ?? 1);
  return Number.isSafeInteger(value) ? value : undefined;
}

function convert(value: unknown, type: FieldType, path: string): unknown {
  if (type === 'any') return value;
  if (type === 'str') {
    if (typeof value !== 'string') invalidType(path, type);
    return value;
  }
  if (type === 'bool') {
    if (typeof value === 'boolean') return value;
    if (typeof value === 'string') {
      if (TRUE.has(value)) return true;
      if (FALSE.has(value)) return false;
      throw new SchemaError(`Parameter '${path}' expects 'on' or 'off'`);
    }
    invalidType(path, type);
  }
  if (type === 'int' || type === 'size') {
    if (typeof value === 'number' && Number.isSafeInteger(value)) return value;
    if (typeof value === 'string') {
      const n =
        type === 'size' ? parseSize(value) : /^-?[0-9]+$/.test(value) ? Number(value) : undefined;
      if (n !== undefined && Number.isSafeInteger(n)) return n;
      throw new SchemaError(
        `Parameter '${path}' expects ${type === 'size' ? 'a non-negative number below 2^64' : 'an integer'}`,
      );
    }
    invalidType(path, type);
  }
  if ('enum' in type) {
    if (typeof value !== 'string') invalidType(path, type);
    if (!type.enum.includes(value))
      throw new SchemaError(`Parameter '${path}' does not accept value '${value}'`);
    return value;
  }
  if ('list' in type) {
    if (!Array.isArray(value)) invalidType(path, type);
    return value.map((v, i) => convert(v, type.list, `${path}[${i}]`));
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) invalidType(path, type);
  return checkStruct(value as Record<string, unknown>, type.struct, `${path}.`);
}

/** Checks `value` against `schema`; returns a copy with converted values. */
export function checkStruct(
  value: Record<string, unknown>,
  schema: Schema,
  prefix = '',
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(value)) {
    if (!(key in schema)) throw new SchemaError(`Parameter '${prefix}${key}' is unexpected`);
  }
  for (const [key, field] of Object.entries(schema)) {
    if (value[key] === undefined) {
      if (field.required) throw new SchemaError(`Parameter '${prefix}${key}' is missing`);
      continue;
    }
    out[key] = convert(value[key], field.type, `${prefix}${key}`);
  }
  return out;
}
