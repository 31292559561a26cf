// qom-list, qom-get and qom-set (qapi/qom.json) on the part of QEMU's object tree the
// daemon has: / with /objects (the graph's user-created objects: secret, throttle-group,
// iothread, tls-creds-psk, tls-creds-x509) and /chardevs (chardevs.ts). The properties of each type
// are QEMU 7.2's (names and types as qemu-storage-daemon lists them); paths resolve as
// QEMU's object_resolve_path does, absolute or partial (a unique trailing match).
import { schema, THROTTLE_LIMIT_KEYS } from '@vmdisk/block-graph';
import type { ChardevBackend } from '../chardevs.ts';
import type { DaemonControl } from './daemon-control.ts';
import { QmpError, type QmpMonitor } from './monitor.ts';

type Getter = () => unknown;

/** A property: its QOM type, its value, and whether qom-set may change it. */
interface Property {
  type: string;
  get: Getter;
  writable: boolean;
}

interface QomObject {
  /** The QOM type (qom-get's `type`, the `child<TYPE>` of its parent). */
  type: string;
  properties: Map<string, Property>;
  children: Map<string, QomObject>;
  /** qom-set of a writable property. */
  set?: (name: string, value: unknown) => void;
}

const container = (children: Map<string, QomObject>): QomObject => ({
  type: 'container',
  properties: new Map(),
  children,
});

/** The default of each ThrottleLimits member: 1 for a burst length, else 0. */
const limitDefault = (key: string) => (key.endsWith('-max-length') ? 1 : 0);

function objectNode(
  daemon: DaemonControl,
  id: string,
  type: string,
  props: Record<string, unknown>,
): QomObject {
  const objects = daemon.graph.objects;
  const properties = new Map<string, Property>();
  const prop = (name: string, t: string, dflt: unknown, writable = true) =>
    properties.set(name, { type: t, get: () => props[name] ?? dflt, writable });
  const loaded = () => properties.set('loaded', { type: 'bool', get: () => true, writable: false });
  switch (type) {
    case 'secret':
      prop('iv', 'string', '');
      prop('keyid', 'string', '');
      loaded();
      prop('format', 'QCryptoSecretFormat', 'raw');
      prop('file', 'string', '');
      prop('data', 'string', '');
      break;
    case 'throttle-group': {
      const limits = () => objects.get('throttle-group', id, 'id').limits;
      const full = () =>
        Object.fromEntries(THROTTLE_LIMIT_KEYS.map((k) => [k, limits()[k] ?? limitDefault(k)]));
      properties.set('limits', { type: 'ThrottleLimits', get: full, writable: true });
      for (const k of THROTTLE_LIMIT_KEYS) {
        properties.set(`x-${k}`, {
          type: 'int',
          get: () => limits()[k] ?? limitDefault(k),
          writable: true,
        });
      }
      break;
    }
    case 'iothread': {
      // In QEMU 7.2's order; the values are the object's (defaults filled in).
      const settings = () => objects.get('iothread', id, 'id');
      const int = (name: string, key: keyof ReturnType<typeof settings>) =>
        properties.set(name, { type: 'int', get: () => settings()[key], writable: true });
      int('thread-pool-min', 'threadPoolMin');
      int('aio-max-batch', 'aioMaxBatch');
      int('thread-pool-max', 'threadPoolMax');
      int('poll-max-ns', 'pollMaxNs');
      int('poll-grow', 'pollGrow');
      int('poll-shrink', 'pollShrink');
      break;
    }
    case 'tls-creds-psk':
    case 'tls-creds-x509':
      prop('endpoint', 'QCryptoTLSCredsEndpoint', 'client');
      prop('dir', 'string', '');
      prop('verify-peer', 'bool', true);
      prop('priority', 'string', '');
      if (type === 'tls-creds-psk') prop('username', 'string', '');
      else {
        prop('sanity-check', 'bool', true);
        prop('passwordid', 'string', '');
      }
      loaded();
      break;
  }
  return {
    type,
    properties,
    children: new Map(),
    set: (name, value) => objects.setProperty(id, name, value),
  };
}

function chardevNode(backend: ChardevBackend, connected: boolean): QomObject {
  if (backend.type === 'null')
    return { type: 'chardev-null', properties: new Map(), children: new Map() };
  const properties = new Map<string, Property>([
    ['connected', { type: 'bool', get: () => connected, writable: false }],
    ['addr', { type: 'SocketAddress', get: () => ({ ...backend.addr }), writable: false }],
  ]);
  return { type: 'chardev-socket', properties, children: new Map() };
}

export function registerQomCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  // QEMU makes /objects with the first object and keeps it: seen here as the first time
  // the tree is looked at with an object in it (or after).
  let objectsContainer = false;

  const tree = (): QomObject => {
    const list = daemon.graph.objects.list();
    if (list.length > 0) objectsContainer = true;
    const root = new Map<string, QomObject>();
    if (objectsContainer) {
      root.set(
        'objects',
        container(
          new Map(
            list.map((o) => [
              o.id,
              objectNode(daemon, o.id, o['qom-type'], o.props as Record<string, unknown>),
            ]),
          ),
        ),
      );
    }
    root.set(
      'chardevs',
      container(
        new Map(daemon.chardevs.list().map((c) => [c.id, chardevNode(c.backend, c.connected)])),
      ),
    );
    return container(root);
  };

  /** object_resolve_path: absolute from /, or partial (one object whose path ends so). */
  const resolve = (path: string): { node: QomObject; path: string } => {
    const root = tree();
    const parts = path.split('/').filter((p) => p !== '');
    if (path.startsWith('/')) {
      let node = root;
      for (const p of parts) {
        const next = node.children.get(p);
        if (!next) throw new QmpError('DeviceNotFound', `Device '${path}' not found`);
        node = next;
      }
      return { node, path: `/${parts.join('/')}` };
    }
    const found: { node: QomObject; path: string }[] = [];
    const walk = (node: QomObject, at: string[]) => {
      const tail = at.slice(at.length - parts.length);
      if (at.length >= parts.length && tail.every((p, i) => p === parts[i])) {
        found.push({ node, path: `/${at.join('/')}` });
      }
      for (const [name, child] of node.children) walk(child, [...at, name]);
    };
    walk(root, []);
    if (found.length > 1) throw new QmpError('GenericError', `Path '${path}' is ambiguous`);
    if (found.length === 0) throw new QmpError('DeviceNotFound', `Device '${path}' not found`);
    return found[0]!;
  };

  /** Every property of `node` as qom-list shows it: type, its own, then its children. */
  const properties = (node: QomObject, at: string): Map<string, Property> => {
    const all = new Map<string, Property>([
      ['type', { type: 'string', get: () => node.type, writable: false }],
    ]);
    for (const [name, p] of node.properties) all.set(name, p);
    for (const [name, child] of node.children) {
      all.set(name, {
        type: `child<${child.type}>`,
        get: () => `${at === '/' ? '' : at}/${name}`,
        writable: false,
      });
    }
    return all;
  };

  const property = (path: string, name: string) => {
    const { node, path: at } = resolve(path);
    const p = properties(node, at).get(name);
    if (!p) throw new QmpError('GenericError', `Property '${node.type}.${name}' not found`);
    return { node, p };
  };

  monitor.register({
    name: 'qom-list',
    args: schema.struct({ path: schema.str }),
    run: ({ path }) => {
      const { node, path: at } = resolve(path);
      return [...properties(node, at)].map(([name, p]) => ({ name, type: p.type }));
    },
  });
  monitor.register({
    name: 'qom-get',
    args: schema.struct({ path: schema.str, property: schema.str }),
    run: ({ path, property: name }) => property(path, name).p.get(),
  });
  monitor.register({
    name: 'qom-set',
    args: schema.struct({ path: schema.str, property: schema.str, value: schema.any }),
    run: ({ path, property: name, value }) => {
      const { node, p } = property(path, name);
      if (!p.writable || !node.set) {
        throw new QmpError('GenericError', `Property '${node.type}.${name}' is not writable`);
      }
      node.set(name, value);
    },
  });
}
