// `vm-disk graph`: draws the live block graph of a running daemon (vm-disk serve, or
// qemu-storage-daemon: it asks only QMP) from x-debug-query-block-graph, as DOT on
// stdout or a file, or as SVG/PNG through Graphviz's `dot`.
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { BadOptionError, VmDiskError } from '../errors.ts';
import { QmpClient } from '../qmp/client.ts';
import { type DebugGraph, type NodeDetails, renderDot } from './render-dot.ts';

const FORMATS = ['dot', 'svg', 'png'] as const;

export async function graph(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  let values: { format?: string; output?: string };
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: [...argv],
      options: {
        format: { type: 'string', short: 'T' },
        output: { type: 'string', short: 'o' },
      },
      allowPositionals: true,
      strict: true,
    }));
  } catch (e) {
    throw new BadOptionError('graph', (e as Error).message.replace(/\. To specify.*$/s, ''));
  }
  const [socket, extra] = positionals;
  if (socket === undefined || extra !== undefined) {
    throw new BadOptionError('graph', 'give one QMP monitor socket path');
  }
  const format = values.format ?? 'dot';
  if (!(FORMATS as readonly string[]).includes(format)) {
    throw new BadOptionError('--format', `'${format}' is not one of ${FORMATS.join(', ')}`);
  }
  if (format !== 'dot' && values.output === undefined) {
    throw new BadOptionError('--format', `${format} needs --output FILE`);
  }

  const client = await QmpClient.connect(socket);
  let dot: string;
  try {
    const g = (await client.execute('x-debug-query-block-graph')) as DebugGraph;
    const named = (await client.execute('query-named-block-nodes')) as {
      'node-name': string;
      drv: string;
      file?: string;
    }[];
    const details = new Map<string, NodeDetails>(
      named.map((n) => [n['node-name'], { drv: n.drv, ...(n.file && { file: n.file }) }]),
    );
    dot = renderDot(g, details);
  } finally {
    client.close();
  }

  if (format === 'dot') {
    if (values.output === undefined) out.write(dot);
    else writeFileSync(values.output, dot);
    return 0;
  }
  const r = spawnSync('dot', [`-T${format}`, '-o', values.output!], { input: dot });
  if (r.error) {
    throw new VmDiskError(
      'ERR_VMDISK_APP_USAGE',
      `cannot run Graphviz's dot (${r.error.message}): install graphviz, or use --format dot`,
    );
  }
  if (r.status !== 0) {
    throw new VmDiskError('ERR_VMDISK_APP_USAGE', `dot failed: ${r.stderr.toString().trim()}`);
  }
  return 0;
}
