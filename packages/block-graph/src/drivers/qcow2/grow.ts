// Growing the image file ahead of allocation (what QEMU's preallocate filter does, with its
// defaults): a data write past the end of the file costs far more than one inside it (on
// ext4 with O_DIRECT an extending write takes the inode lock and is punted to a kernel
// worker), so when an allocation reaches past the end, the file is first extended
// (sparsely, by truncate) to 128 MiB beyond it, 1 MiB aligned. On close the file is cut back
// to the end of the last cluster in use, never below its size at open.
//
// Crash safety: the extension holds nothing the metadata refers to; after a crash the file
// keeps a sparse tail of unreferenced, unrefcounted clusters, which `qemu-img check` does
// not count (not even as leaks).

import type { Qcow2State } from './state.ts';

const GROW_AHEAD = 128 * 1024 * 1024;
const GROW_ALIGN = 1024 * 1024;

/** The state of growth ahead, kept on the image state. */
export interface FileGrowth {
  /** The file's size as we last set or saw it. */
  end: number;
  /** Its size at open: never cut below it. */
  openEnd: number;
  /** Whether we extended the file (then close cuts it back). */
  grown: boolean;
  /** An extension in flight. */
  pending: Promise<void> | null;
  /** Off after a failed truncate (a file that cannot grow that way): writes extend it. */
  enabled: boolean;
}

export async function initGrowth(s: Qcow2State): Promise<void> {
  const end = await s.file.size();
  s.growth = { end, openEnd: end, grown: false, pending: null, enabled: !s.readOnly };
}

/**
 * Makes sure the file reaches `end` before a data write there (extending it well beyond).
 * Synchronous in the common case (already inside the file).
 */
export function growFor(s: Qcow2State, end: number): Promise<void> | undefined {
  const g = s.growth;
  if (end <= g.end || !g.enabled) return undefined;
  return grow(s, end);
}

async function grow(s: Qcow2State, end: number): Promise<void> {
  const g = s.growth;
  while (end > g.end && g.enabled) {
    if (g.pending) {
      await g.pending;
      continue;
    }
    const target = Math.ceil((end + GROW_AHEAD) / GROW_ALIGN) * GROW_ALIGN;
    g.pending = (async () => {
      try {
        // Someone else may have grown it (a metadata write past the end).
        const now = await s.file.size();
        if (now < target) {
          await s.file.truncate(target);
          g.grown = true;
        }
        g.end = Math.max(now, target);
      } catch {
        g.enabled = false;
      } finally {
        g.pending = null;
      }
    })();
    await g.pending;
  }
}

/**
 * Cuts the file back to the end of the last cluster in use (never below its size at open).
 * Precondition: everything written back, nothing in flight.
 */
export async function trimGrowth(s: Qcow2State): Promise<void> {
  const g = s.growth;
  if (!g.grown) return;
  const used = await s.refcounts.usedEnd(g.openEnd);
  const keep = Math.max(used, g.openEnd);
  if ((await s.file.size()) > keep) await s.file.truncate(keep);
  g.end = keep;
  g.grown = false;
}
