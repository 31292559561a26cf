// What keeps the opening of a backing chain finite. A format that opens the backing file its
// header names (ctx.openChild) could otherwise follow a chain that comes back to itself
// (a self-loop, a -> b -> a) for ever, each level opening the file again.
//
// - A loop: the backing file opened through openChild is a file (same device and inode,
//   whatever its name: relative, absolute, through a symlink) that a node above it in the
//   chain, one whose backing comes from its header too, already has open. Files named
//   twice by other means (an explicit `backing`, a base shared by two overlays) are no loop.
// - Depth: QEMU 7.2 has no limit (it opens a chain of 1100 images, and its reads overflow
//   their stack past 1091 backing files); the graph refuses chains deeper than
//   `maxBackingDepth` backing files (default DEFAULT_MAX_BACKING_DEPTH), which also ends
//   any loop inode identity cannot see.

import { stat } from 'node:fs/promises';
import { BackingChainError, BlockErrorCode } from './errors.ts';
import type { NodeSpec } from './options.ts';

/** The default of BlockGraphOptions.maxBackingDepth: backing files below one image. */
export const DEFAULT_MAX_BACKING_DEPTH = 1000;

/** Where a node being opened sits: under how many backing edges, below which files. */
export interface OpenChain {
  /** Backing (cow) edges between the top node and this one. */
  readonly depth: number;
  /** Files (dev:ino) of the nodes above that opened their backing from their header. */
  readonly files: ReadonlySet<string>;
}

export const TOP_OF_CHAIN: OpenChain = { depth: 0, files: new Set() };

/** The identity (device:inode) of the file at `path`; undefined when it cannot be seen. */
export async function fileIdentity(path: string): Promise<string | undefined> {
  try {
    const st = await stat(path, { bigint: true });
    return `${st.dev}:${st.ino}`;
  } catch {
    return undefined; // the driver's open reports what is wrong with it
  }
}

/** The file a spec is about, for messages: its own filename, else its file child's. */
export function specFilename(spec: NodeSpec): string | undefined {
  if (typeof spec.options.filename === 'string') return spec.options.filename;
  for (const [key, c] of Object.entries(spec.children)) {
    if (key === 'backing' || c === null || typeof c === 'string') continue;
    const name = specFilename(c);
    if (name !== undefined) return name;
  }
  return undefined;
}

/** The chain of a child below `chain` (a backing edge when `cow`), checked for depth. */
export function childChain(
  chain: OpenChain,
  cow: boolean,
  spec: NodeSpec,
  maxDepth: number,
  files?: Iterable<string>,
): OpenChain {
  const depth = chain.depth + (cow ? 1 : 0);
  if (depth > maxDepth) {
    const name = specFilename(spec) ?? spec.nodeName ?? spec.driver.name;
    throw new BackingChainError(
      BlockErrorCode.BACKING_CHAIN_TOO_DEEP,
      name,
      `Backing file '${name}' is too deep in the backing chain (more than ${maxDepth} backing files)`,
    );
  }
  if (files === undefined) return depth === chain.depth ? chain : { depth, files: chain.files };
  const all = new Set(chain.files);
  for (const f of files) all.add(f);
  return { depth, files: all };
}

/** Throws when the file `id` at `filename` is already open above in the chain. */
export function checkLoop(chain: OpenChain, id: string | undefined, filename: string): void {
  if (id !== undefined && chain.files.has(id)) {
    throw new BackingChainError(
      BlockErrorCode.BACKING_LOOP,
      filename,
      `Backing file '${filename}' creates an infinite loop`,
    );
  }
}
