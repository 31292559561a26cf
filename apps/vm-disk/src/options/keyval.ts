// QEMU's KEY=VALUE,... syntax (util/keyval.c), as qemu-storage-daemon parses --blockdev,
// --export, --nbd-server, --object, --chardev and --monitor:
//
//   key-vals = [ key-val { ',' key-val } [ ',' ] ]     key-val = key '=' val
//   key      = fragment { '.' fragment }               val = { [^,] | ',,' }
//
// Dotted keys build nested objects; all-numeric fragments (0, 1, ...) build arrays, which
// must have no gaps; when several key-vals name the same leaf, the last one wins. With an
// implied key, the first key-val may be a bare value (`socket,id=c0` is
// `backend=socket,id=c0`). Scalars are strings: the consumer converts them to the type
// it expects (schema.ts; the block graph for --blockdev), as QEMU's keyval input visitor
// does.
import { VmDiskError } from '../errors.ts';

export type KeyvalValue = string | KeyvalObject | KeyvalValue[];
export interface KeyvalObject {
  [key: string]: KeyvalValue;
}

const NAME = /^(?:__[a-z0-9.-]+_)?[A-Za-z][A-Za-z0-9_-]*$/;
const INDEX = /^[0-9]+$/;
const MAX_FRAGMENT = 127;

function fail(message: string): never {
  throw new VmDiskError('ERR_VMDISK_APP_KEYVAL', message);
}

/** Parses `params`; `impliedKey` names the key of a leading bare value. */
export function parseKeyval(params: string, impliedKey?: string): KeyvalObject {
  // Intermediate tree: objects only (Map keeps insertion order); arrays come at the end.
  type Node = Map<string, Node | string>;
  const root: Node = new Map();
  let pos = 0;
  let first = true;

  while (pos < params.length) {
    let keyEnd = pos;
    while (keyEnd < params.length && params[keyEnd] !== '=' && params[keyEnd] !== ',') keyEnd++;
    let key: string;
    let valueStart: number;
    if (first && impliedKey && keyEnd > pos && params[keyEnd] !== '=') {
      key = impliedKey;
      valueStart = pos;
    } else {
      key = params.slice(pos, keyEnd);
      if (params[keyEnd] !== '=') fail(`Expected '=' after parameter '${key}'`);
      valueStart = keyEnd + 1;
    }
    first = false;

    let value = '';
    let i = valueStart;
    for (;;) {
      if (i >= params.length) break;
      if (params[i] === ',') {
        if (params[i + 1] !== ',') {
          i++;
          break;
        }
        i++;
      }
      value += params[i++];
    }
    pos = i;

    const fragments = key.split('.');
    let cur = root;
    fragments.forEach((fragment, n) => {
      const valid = n > 0 && INDEX.test(fragment) ? true : NAME.test(fragment);
      if (!valid) fail(`Invalid parameter '${key}'`);
      if (fragment.length > MAX_FRAGMENT) {
        fail(`Parameter${fragments.length > 1 ? ' fragment' : ''} '${fragment}' is too long`);
      }
      const last = n === fragments.length - 1;
      const old = cur.get(fragment);
      const path = fragments.slice(0, n + 1).join('.');
      if (last) {
        if (old !== undefined && typeof old !== 'string') {
          fail(`Parameters '${path}.*' used inconsistently`);
        }
        cur.set(fragment, value);
      } else {
        if (typeof old === 'string') fail(`Parameters '${path}.*' used inconsistently`);
        const next: Node = old ?? new Map();
        cur.set(fragment, next);
        cur = next;
      }
    });
  }

  const listify = (node: Node, path: string): KeyvalObject | KeyvalValue[] => {
    const keys = [...node.keys()];
    const indexes = keys.filter((k) => INDEX.test(k));
    const convert = (v: Node | string, k: string): KeyvalValue =>
      typeof v === 'string' ? v : listify(v, `${path}${k}.`);
    if (indexes.length === 0) {
      const out: KeyvalObject = {};
      for (const [k, v] of node) out[k] = convert(v, k);
      return out;
    }
    if (indexes.length !== keys.length) fail(`Parameters '${path}*' used inconsistently`);
    const out: KeyvalValue[] = [];
    for (const [k, v] of node) {
      const index = Number(k);
      if (index >= keys.length) continue;
      out[index] = convert(v, k);
    }
    for (let n = 0; n < keys.length; n++) {
      if (out[n] === undefined) fail(`Parameter '${path}${n}' missing`);
    }
    return out;
  };
  return listify(root, '') as KeyvalObject;
}
