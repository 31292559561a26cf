// chardev-add, chardev-remove and query-chardev (qapi/char.json) on the daemon's chardevs
// (chardevs.ts): socket (listening, unix or inet) and null backends, with QEMU's
// arguments for them and qemu-storage-daemon 7.2's replies and errors.
import { schema } from '@vmdisk/block-graph';
import type { ChardevBackend, ChardevRegistry } from '../chardevs.ts';
import { inetSocketAddress, unixSocketAddress } from '../options/serve-options.ts';
import { QmpError, type QmpMonitor } from './monitor.ts';

const { bool, opt, str, struct, union } = schema;

/** SocketAddressLegacy: {type, data: {...}}. */
const addr = union(
  'type',
  {},
  {
    inet: { data: struct(inetSocketAddress) },
    unix: { data: struct(unixSocketAddress) },
  },
);

/** ChardevBackend: the backends vm-disk has, with the members of them it takes. */
const backend = union(
  'type',
  {},
  {
    socket: { data: struct({ addr, server: opt(bool), wait: opt(bool) }) },
    null: { data: struct({}) },
  },
);

export function registerChardevCommands(monitor: QmpMonitor, chardevs: ChardevRegistry): void {
  monitor.register({
    name: 'chardev-add',
    args: struct({ id: str, backend }),
    run: async ({ id, backend: b }) => {
      let given: ChardevBackend;
      if (b.type === 'null') given = { type: 'null' };
      else {
        // A client socket would connect out; the daemon's chardevs are for clients to reach it.
        if (b.data.server === false) {
          throw new QmpError(
            'GenericError',
            `Failed to add chardev '${id}': vm-disk's socket chardevs listen (server=on)`,
          );
        }
        const a = b.data.addr;
        given = {
          type: 'socket',
          addr: a.type === 'unix' ? { type: 'unix', ...a.data } : { type: 'inet', ...a.data },
        };
      }
      if (chardevs.has(id)) {
        throw new QmpError('GenericError', `Chardev with id '${id}' already exists`);
      }
      try {
        await chardevs.add(id, given);
      } catch (e) {
        if (!(e instanceof QmpError)) throw e;
        throw new QmpError('GenericError', `Failed to add chardev '${id}': ${e.message}`);
      }
      return {};
    },
  });
  monitor.register({
    name: 'chardev-remove',
    args: struct({ id: str }),
    run: ({ id }) => chardevs.remove(id),
  });
  monitor.register({ name: 'query-chardev', run: () => chardevs.query() });
}
