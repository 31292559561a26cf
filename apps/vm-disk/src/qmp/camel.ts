// QMP arguments (kebab-case, as QEMU's schema names them) as the graph's options (camelCase).

type Camel<S extends string> = S extends `${infer H}-${infer T}`
  ? `${H}${Capitalize<Camel<T>>}`
  : S;

/** QMP's kebab-case members as the graph's camelCase options, absent ones left out. */
export type CamelKeys<T> = { [K in keyof T as Camel<K & string>]: Exclude<T[K], undefined> };

export function camel<T extends object>(args: T): CamelKeys<T> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(args)) {
    if (v !== undefined) out[k.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase())] = v;
  }
  return out as CamelKeys<T>;
}
