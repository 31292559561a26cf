// A value of qemu-img info's format-specific data in its human form (QEMU's dump_qobject):
// "key: value", lists and dicts on the lines below, each level 4 spaces further in, list
// items named [0], [1], ...; dashes in keys become spaces.

export function humanField(key: string, value: unknown, indent: number): string[] {
  const pad = ' '.repeat(indent);
  const name = key.replaceAll('-', ' ');
  if (Array.isArray(value))
    return [`${pad}${name}:`, ...value.flatMap((v, i) => humanField(`[${i}]`, v, indent + 4))];
  if (typeof value === 'object' && value !== null) {
    const fields = Object.entries(value).flatMap(([k, v]) => humanField(k, v, indent + 4));
    return [`${pad}${name}:`, ...fields];
  }
  return [`${pad}${name}: ${value}`];
}
