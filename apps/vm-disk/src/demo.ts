// `vm-disk demo`: the built-in default. Creates (once) a small raw base image with
// recognisable content and a qcow2 overlay on it in a data directory, serves the overlay
// over NBD with a QMP monitor, and prints what to try. Stops cleanly on Ctrl-C.
import { existsSync, mkdirSync, renameSync } from 'node:fs';
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { sharedEngine } from '@vmdisk/engine';
import { BadOptionError } from './errors.ts';
import { create } from './img/create.ts';
import { createLogger } from './log.ts';
import { startDaemon } from './root.ts';
import { serveUntilStopped } from './serve.ts';

const BASE_SIZE = 64 << 20;
const MiB = 1 << 20;

/** The text at the start of each MiB of the demo's base image. */
export function demoText(mib: number): string {
  return `vm-disk demo base image: this is MiB ${mib} of ${BASE_SIZE / MiB}\n`;
}

async function makeImages(
  dir: string,
  out: NodeJS.WritableStream,
): Promise<{ base: string; overlay: string }> {
  const base = resolve(dir, 'base.raw');
  const overlay = resolve(dir, 'overlay.qcow2');
  if (!existsSync(base)) {
    mkdirSync(dir, { recursive: true });
    await create(['-q', '-f', 'raw', `${base}.tmp`, String(BASE_SIZE)], out);
    const file = await (await sharedEngine()).openFile(`${base}.tmp`);
    try {
      for (let mib = 0; mib < BASE_SIZE / MiB; mib++)
        await file.write(Buffer.from(demoText(mib)), mib * MiB);
      await file.fdatasync();
    } finally {
      await file.close();
    }
    renameSync(`${base}.tmp`, base);
  }
  if (!existsSync(overlay))
    await create(['-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay], out);
  return { base, overlay };
}

export async function demo(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      dir: { type: 'string', default: process.env.VMDISK_DEMO_DIR ?? '.vm-disk/demo' },
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '10809' },
    },
  });
  const dir = resolve(values.dir);
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535)
    throw new BadOptionError('--port', `'${values.port}' is not a port`);
  const { base, overlay } = await makeImages(dir, out);
  const qmp = resolve(dir, 'qmp.sock');
  const log = createLogger();
  const daemon = await startDaemon(
    {
      blockdevs: [
        {
          options: {
            driver: 'qcow2',
            'node-name': 'demo',
            file: { driver: 'file', filename: overlay },
          },
          syntax: 'json',
        },
      ],
      nbdServer: { addr: { type: 'inet', host: values.host, port: String(port) } },
      exports: [
        {
          type: 'nbd',
          id: 'demo',
          nodeName: 'demo',
          name: 'demo',
          description: 'vm-disk demo overlay',
          writable: true,
          allocationDepth: true,
        },
      ],
      objects: [],
      monitors: [{ chardev: { id: 'qmp', path: qmp, server: true, wait: false }, pretty: false }],
    },
    log,
  );
  const address = daemon.nbdAddress;
  const uri = address && 'port' in address ? `nbd://${address.host}:${address.port}/demo` : '';
  out.write(`
vm-disk demo: serving ${overlay}
  (a qcow2 overlay on ${base}, whose every MiB starts with a line of text)

  NBD export   ${uri}
  QMP monitor  ${qmp}

Try, from another terminal:
  qemu-img info ${uri}
  nbdinfo --map ${uri}
  qemu-io -f raw -c 'read -v 0 64' ${uri}
  qemu-io -f raw -c 'write -P 0x55 1M 64k' ${uri}   # lands in the overlay only
  vm-disk map ${overlay}
  qemu-system-x86_64 -drive file=${uri},format=raw,if=virtio ...
  QMP: send {"execute":"qmp_capabilities"} then {"execute":"query-block-exports"} to ${qmp}

Stop with Ctrl-C: the export is removed and the overlay closed clean.
`);
  return serveUntilStopped(daemon, log);
}
