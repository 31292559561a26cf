// query-qmp-schema (QEMU's qapi/introspect.json): the monitor's commands and events as
// SchemaInfo, made from the very schemas that check the arguments, so that what a client
// learns here is what the monitor accepts. As QEMU does, types other than the builtins
// are named by numbers ("masked"); arrays are named "[element]"; an optional member has
// `default: null`; "0" is the empty object (the arguments of a command that takes none).
import type { TypeInfo } from '@vmdisk/block-graph';

export type SchemaInfo = { name: string; 'meta-type': string } & Record<string, unknown>;

export interface IntrospectedCommand {
  name: string;
  /** The arguments (absent: none). */
  args?: TypeInfo;
  /** What it returns (absent: any value). */
  returns?: TypeInfo;
}

export interface IntrospectedEvent {
  name: string;
  /** The event's data (absent: none). */
  data?: TypeInfo;
}

/** QEMU's builtin types: every integer type is `int` on the wire. */
const BUILTINS: readonly SchemaInfo[] = [
  { name: 'str', 'meta-type': 'builtin', 'json-type': 'string' },
  { name: 'any', 'meta-type': 'builtin', 'json-type': 'value' },
  { name: 'bool', 'meta-type': 'builtin', 'json-type': 'boolean' },
  { name: 'int', 'meta-type': 'builtin', 'json-type': 'int' },
  { name: 'null', 'meta-type': 'builtin', 'json-type': 'null' },
  { name: 'number', 'meta-type': 'builtin', 'json-type': 'number' },
];

const EMPTY_OBJECT = '0';

/** Names types as it meets them; the same shape twice gets one name. */
class TypeTable {
  readonly entries: SchemaInfo[] = [];
  readonly #byShape = new Map<string, string>();
  #next = 0;

  constructor() {
    this.#masked({ 'meta-type': 'object', members: [] });
  }

  name(info: TypeInfo): string {
    switch (info.meta) {
      case 'builtin':
        return info.name === 'str' || info.name === 'bool' || info.name === 'any'
          ? info.name
          : 'int';
      // Checked by code of its own: any value, as far as a client can tell from here.
      case 'custom':
        return 'any';
      case 'enum':
        return this.#masked({
          'meta-type': 'enum',
          members: info.values.map((name) => ({ name })),
          values: [...info.values],
        });
      case 'array': {
        const element = this.name(info.element);
        return this.#named(`[${element}]`, { 'meta-type': 'array', 'element-type': element });
      }
      case 'object': {
        const members = this.#members(info.members);
        if (info.tag === undefined || info.variants === undefined) {
          return this.#masked({ 'meta-type': 'object', members });
        }
        const variants = Object.entries(info.variants).map(([c, m]) => ({
          case: c,
          type: this.#masked({ 'meta-type': 'object', members: this.#members(m) }),
        }));
        return this.#masked({ 'meta-type': 'object', members, tag: info.tag, variants });
      }
    }
  }

  #members(members: readonly { name: string; type: TypeInfo; optional: boolean }[]) {
    return members.map((m) => ({
      name: m.name,
      ...(m.optional && { default: null }),
      type: this.name(m.type),
    }));
  }

  #masked(shape: Record<string, unknown> & { 'meta-type': string }): string {
    const key = JSON.stringify(shape);
    const known = this.#byShape.get(key);
    if (known !== undefined) return known;
    const name = String(this.#next++);
    this.#byShape.set(key, name);
    this.entries.push({ name, ...shape });
    return name;
  }

  #named(name: string, shape: Record<string, unknown> & { 'meta-type': string }): string {
    if (!this.#byShape.has(name)) {
      this.#byShape.set(name, name);
      this.entries.push({ name, ...shape });
    }
    return name;
  }
}

/** The SchemaInfo list query-qmp-schema answers: commands, events, then their types. */
export function introspect(
  commands: readonly IntrospectedCommand[],
  events: readonly IntrospectedEvent[],
): SchemaInfo[] {
  const types = new TypeTable();
  const entities: SchemaInfo[] = [];
  for (const c of commands) {
    entities.push({
      name: c.name,
      'meta-type': 'command',
      'arg-type': c.args ? types.name(c.args) : EMPTY_OBJECT,
      'ret-type': c.returns ? types.name(c.returns) : 'any',
    });
  }
  for (const e of events) {
    entities.push({
      name: e.name,
      'meta-type': 'event',
      'arg-type': e.data ? types.name(e.data) : EMPTY_OBJECT,
    });
  }
  return [...entities, ...types.entries, ...BUILTINS];
}
