// `vm-disk snapshot`, as `qemu-img snapshot`: list (-l), create (-c), apply (-a) and
// delete (-d) the internal snapshots of a qcow2 image (block-graph's qcow2 snapshots),
// with qemu-img's table, messages and exit statuses. Formats without internal snapshots
// list none and refuse the rest in qemu-img's words.
import {
  applyQcow2Snapshot,
  createQcow2Snapshot,
  deleteQcow2Snapshot,
  listQcow2Snapshots,
  type Qcow2Snapshot,
  Qcow2SnapshotNotFound,
  withQcow2File,
} from '@vmdisk/block-graph';
import { ImageCommandError, UsageError } from '../errors.ts';
import { imgArgs } from './args.ts';
import { openImageFile, probeImage } from './image-file.ts';
import { imageGraph } from './open.ts';

type Action = 'list' | 'create' | 'apply' | 'delete';

export async function snapshot(
  argv: readonly string[],
  out: NodeJS.WritableStream,
): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    list: { type: 'boolean', short: 'l', default: false },
    apply: { type: 'string', short: 'a' },
    create: { type: 'string', short: 'c' },
    delete: { type: 'string', short: 'd' },
    format: { type: 'string', short: 'f' },
    quiet: { type: 'boolean', short: 'q', default: false },
    'force-share': { type: 'boolean', short: 'U', default: false },
    'image-opts': { type: 'boolean', default: false },
    object: { type: 'string', multiple: true, default: [] },
  });
  const actions: Array<[Action, string]> = [];
  if (values.list) actions.push(['list', '']);
  if (values.apply !== undefined) actions.push(['apply', values.apply]);
  if (values.create !== undefined) actions.push(['create', values.create]);
  if (values.delete !== undefined) actions.push(['delete', values.delete]);
  if (actions.length > 1) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
  if (positionals.length !== 1) throw new UsageError('Expecting one image file name');
  const filename = positionals[0]!;
  const [action, name] = actions[0] ?? [undefined, ''];
  const readOnly = action === undefined || action === 'list';
  const spec = {
    name: filename,
    format: values.format,
    imageOpts: values['image-opts'],
    readOnly,
    forceShare: values['force-share'],
  };
  if (spec.forceShare && !readOnly) {
    throw new ImageCommandError(
      `Could not open '${filename}': force-share=on can only be used with read-only images`,
    );
  }
  // Opened first as qemu-img opens it (its errors, its locks).
  const options = await probeImage(spec, values.object);
  if (action === undefined) return 0;
  if (options.driver !== 'qcow2') return refuse(action, name);

  // The snapshot work is on the image's file: its `file` node, alone.
  const graph = await imageGraph(values.object);
  try {
    const file = await openImageFile(graph, spec, options);
    try {
      switch (action) {
        case 'list': {
          const list = await withQcow2File(file, true, listQcow2Snapshots);
          out.write(snapshotTable(list));
          return 0;
        }
        case 'create':
          await withQcow2File(file, false, (img) => createQcow2Snapshot(img, { name }));
          return 0;
        case 'apply':
          await withQcow2File(file, false, (img) => applyQcow2Snapshot(img, { idOrName: name }));
          return 0;
        default:
          await withQcow2File(file, false, (img) => deleteQcow2Snapshot(img, { name }));
          return 0;
      }
    } catch (e) {
      throw failed(action, name, e);
    }
  } finally {
    await graph.close();
  }
}

/** What qemu-img says of a format without internal snapshots. */
function refuse(action: Action, name: string): number {
  switch (action) {
    case 'list':
      return 0;
    case 'create':
      throw new ImageCommandError(
        `Could not create snapshot '${name}': -95 (Operation not supported)`,
      );
    case 'apply':
      throw new ImageCommandError(
        `Could not apply snapshot '${name}': Block driver does not support snapshots`,
      );
    default:
      throw new ImageCommandError(`Could not delete snapshot '${name}': snapshot not found`);
  }
}

function failed(action: Action, name: string, e: unknown): unknown {
  const message = (e as Error).message ?? String(e);
  const notFound = e instanceof Qcow2SnapshotNotFound;
  switch (action) {
    case 'create':
      return new ImageCommandError(`Could not create snapshot '${name}': ${message}`, { cause: e });
    case 'apply':
      return new ImageCommandError(
        `Could not apply snapshot '${name}': ${notFound ? 'Failed to load snapshot: No such file or directory' : message}`,
        { cause: e },
      );
    case 'delete':
      return new ImageCommandError(
        `Could not delete snapshot '${name}': ${notFound ? 'snapshot not found' : message}`,
        { cause: e },
      );
    default:
      return e;
  }
}

/** qemu-img's snapshot table (bdrv_snapshot_dump's columns); nothing without snapshots. */
export function snapshotTable(list: readonly Qcow2Snapshot[]): string {
  if (list.length === 0) return '';
  const head = `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
  const rows = list.map(
    (sn) =>
      `${sn.id.padEnd(9)} ${sn.name.padEnd(16)} ${sizeToStr(sn.vmStateSize).padStart(8)}` +
      `${dateOf(sn.dateSec).padStart(20)}${clockOf(sn.vmClockNsec).padStart(13)}` +
      `${(sn.icount === -1n ? '' : String(sn.icount)).padStart(11)}`,
  );
  return `Snapshot list:\n${head}\n${rows.join('\n')}\n`;
}

const two = (n: number) => String(n).padStart(2, '0');

/** Local time, as QEMU's strftime("%Y-%m-%d %H:%M:%S", localtime). */
function dateOf(sec: number): string {
  const d = new Date(sec * 1000);
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

function clockOf(nsec: bigint): string {
  const ms = Number(nsec / 1_000_000n);
  const secs = Math.floor(ms / 1000);
  const h = Math.floor(secs / 3600);
  return `${two(h)}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(ms % 1000).padStart(3, '0')}`;
}

/** QEMU's size_to_str: three significant digits and a binary unit. */
function sizeToStr(v: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  if (v === 0) return '0 B';
  // frexp(v / (1000 / 1024)) gives the exponent e with 2^(e-1) <= x < 2^e.
  const e = Math.floor(Math.log2(v / (1000 / 1024))) + 1;
  const i = Math.min(Math.floor((e - 1) / 10), units.length - 1);
  return `${Number((v / 2 ** (i * 10)).toPrecision(3))} ${units[i]}`;
}
