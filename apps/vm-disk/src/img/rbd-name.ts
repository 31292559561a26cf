// `rbd:` image names as qemu-img takes them (QEMU 7.2's qemu_rbd_parse_filename):
//   rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:KEY=VALUE...]
// where `id` is the user, `conf` the ceph.conf, and any other key a librados setting
// (mon_host, key, rados_osd_op_timeout...); a backslash escapes the next character.
import { UsageError } from '../errors.ts';

/** The text up to the first unescaped `delim`, and the rest after it (undefined: none). */
function nextToken(text: string, delim: string): [string, string | undefined] {
  for (let i = 0; i < text.length; i++) {
    if (text[i] === '\\') i++;
    else if (text[i] === delim) return [text.slice(0, i), text.slice(i + 1)];
  }
  return [text, undefined];
}

function hasUnescaped(text: string, c: string): boolean {
  return nextToken(text, c)[1] !== undefined;
}

const unescapeRbd = (text: string): string => text.replace(/\\(.)/g, '$1');

/** The rbd node options of an `rbd:` name, or undefined for any other name. */
export function rbdFilename(text: string): Record<string, unknown> | undefined {
  if (!text.startsWith('rbd:')) return undefined;
  const [pool, rest] = nextToken(text.slice(4), '/');
  if (rest === undefined) throw new UsageError(`${text}: Pool name is required`);
  const options: Record<string, unknown> = { driver: 'rbd', pool: unescapeRbd(pool) };
  let image: string;
  let p: string | undefined;
  if (hasUnescaped(rest, '@')) {
    let after: string | undefined;
    [image, after] = nextToken(rest, '@');
    const [snapshot, tail] = nextToken(after ?? '', ':');
    options.snapshot = unescapeRbd(snapshot);
    p = tail;
  } else {
    [image, p] = nextToken(rest, ':');
  }
  if (hasUnescaped(image, '/')) {
    const [ns, img] = nextToken(image, '/');
    options.namespace = unescapeRbd(ns);
    image = img ?? '';
  }
  options.image = unescapeRbd(image);
  const pairs: string[] = [];
  while (p !== undefined) {
    const [name, afterName] = nextToken(p, '=');
    if (afterName === undefined) throw new UsageError(`conf option ${name} has no value`);
    const [value, next] = nextToken(afterName, ':');
    p = next;
    const key = unescapeRbd(name);
    if (key === 'conf') options.conf = unescapeRbd(value);
    else if (key === 'id') options.user = unescapeRbd(value);
    else pairs.push(key, unescapeRbd(value));
  }
  if (pairs.length > 0) options['=keyvalue-pairs'] = JSON.stringify(pairs);
  return options;
}
