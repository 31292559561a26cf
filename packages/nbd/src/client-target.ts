// An NbdClient seen as an ExportTarget: what a remote export can do, offered to whatever
// serves ExportTargets (our NbdServer, to proxy a remote disk). Block status merges
// base:allocation with qemu:allocation-depth when the client selected both.

import type { NbdClient } from './client.ts';
import type { NbdExtent } from './client-replies.ts';
import { NbdCommandError } from './errors.ts';
import type { ExportTarget, Extent, WriteFlags, WriteZeroesFlags } from './export-target.ts';
import { META_CONTEXT_ALLOCATION_DEPTH, META_CONTEXT_BASE_ALLOCATION } from './protocol.ts';

/** Cuts two extent lists (from the same offset) at each other's boundaries. */
function mergeDepth(base: NbdExtent[], depth: NbdExtent[]): Extent[] {
  const out: Extent[] = [];
  let i = 0;
  let j = 0;
  let leftA = base[0]?.length ?? 0;
  let leftB = depth[0]?.length ?? 0;
  while (i < base.length && j < depth.length) {
    const n = Math.min(leftA, leftB);
    const a = base[i]!;
    const d = depth[j]!.depth ?? 0;
    const last = out[out.length - 1];
    if (last && last.hole === a.hole && last.zero === a.zero && last.depth === d) last.length += n;
    else out.push({ length: n, hole: a.hole, zero: a.zero, depth: d });
    leftA -= n;
    leftB -= n;
    if (leftA === 0 && ++i < base.length) leftA = base[i]!.length;
    if (leftB === 0 && ++j < depth.length) leftB = depth[j]!.length;
  }
  return out;
}

/**
 * The ExportTarget of a connected client. Methods exist only where the export allows
 * them (a read-only export has no write); FUA without native support is a write then a
 * flush. The client stays the caller's: closing it is theirs to do.
 */
export function nbdClientTarget(client: NbdClient): ExportTarget {
  const contexts = client.metaContexts;
  const hasBase = contexts.includes(META_CONTEXT_BASE_ALLOCATION);
  const hasDepth = contexts.includes(META_CONTEXT_ALLOCATION_DEPTH);
  const writable = !client.readOnly;
  const fua = (flags: WriteFlags): { fua?: boolean } =>
    flags.fua && client.canFua ? { fua: true } : {};
  const afterFua = async (flags: WriteFlags): Promise<void> => {
    if (flags.fua && !client.canFua && client.canFlush) await client.flush();
  };

  const target: ExportTarget = {
    size: () => client.size,
    read: async (offset, buf) => {
      await client.read(offset, buf);
    },
    nativeFua: client.canFua,
    multiConnSafe: client.canMultiConn,
    reportsDepth: hasBase && hasDepth,
    ...(client.blockSize ? { blockSize: client.blockSize } : {}),
  };
  if (writable) {
    target.write = async (offset, buf, flags) => {
      await client.write(offset, buf, fua(flags));
      await afterFua(flags);
    };
  }
  if (client.canFlush) target.flush = () => client.flush();
  if (writable && client.canTrim) {
    target.trim = async (offset, length, flags) => {
      await client.trim(offset, length, fua(flags));
      await afterFua(flags);
    };
  }
  if (writable && client.canWriteZeroes) {
    target.writeZeroes = async (offset, length, flags: WriteZeroesFlags) => {
      if (flags.fastZero && !client.canFastZero) {
        // What the remote server would answer: ENOTSUP, quickly.
        throw new NbdCommandError('WRITE_ZEROES', offset, length, 95, 'ENOTSUP', 'no fast zero');
      }
      const opts: { fua?: boolean; noHole?: boolean; fastZero?: boolean } = fua(flags);
      if (flags.noHole) opts.noHole = true;
      if (flags.fastZero) opts.fastZero = true;
      await client.writeZeroes(offset, length, opts);
      await afterFua(flags);
    };
  }
  if (client.canCache) target.cache = (offset, length) => client.cache(offset, length);
  if (hasBase) {
    target.blockStatus = async (offset, length) => {
      const got = await client.blockStatus(offset, length);
      const base = got.get(META_CONTEXT_BASE_ALLOCATION)!;
      const depth = got.get(META_CONTEXT_ALLOCATION_DEPTH);
      if (depth) return mergeDepth(base, depth);
      return base.map(({ length: n, hole, zero }) => ({ length: n, hole, zero }));
    };
  }
  return target;
}
