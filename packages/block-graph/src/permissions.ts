// Permissions on a BdrvChild edge (QEMU's BLK_PERM_*), and the default rules by which a node
// passes its parents' permissions on to its own children (bdrv_default_perms).

export const BLK_PERM_CONSISTENT_READ = 0x01;
export const BLK_PERM_WRITE = 0x02;
export const BLK_PERM_WRITE_UNCHANGED = 0x04;
export const BLK_PERM_RESIZE = 0x08;
export const BLK_PERM_ALL = 0x0f;

export type PermissionName = 'consistent-read' | 'write' | 'write-unchanged' | 'resize';

const names: [number, PermissionName][] = [
  [BLK_PERM_CONSISTENT_READ, 'consistent-read'],
  [BLK_PERM_WRITE, 'write'],
  [BLK_PERM_WRITE_UNCHANGED, 'write-unchanged'],
  [BLK_PERM_RESIZE, 'resize'],
];

export function permNames(perm: number): PermissionName[] {
  return names.filter(([bit]) => perm & bit).map(([, name]) => name);
}

export function permBits(list: readonly PermissionName[]): number {
  let bits = 0;
  for (const n of list) {
    const found = names.find(([, name]) => name === n);
    if (!found) throw new TypeError(`unknown permission '${n}'`);
    bits |= found[0];
  }
  return bits;
}

/**
 * Roles of a child (QEMU's BdrvChildRole): `data` (guest data lives there), `metadata` (the
 * format's own metadata lives there), `filtered` (a filter's or raw's pass-through child),
 * `cow` (a backing file: unallocated ranges read from it), `primary` (the node's main child).
 */
export type ChildRole = 'data' | 'metadata' | 'filtered' | 'cow' | 'primary';

const PASSTHROUGH =
  BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_RESIZE;

/**
 * The permissions a node takes on a child of the given roles, given the cumulative
 * permissions its parents take on it (perm) and share (shared), and whether it may write.
 */
export function defaultChildPerms(
  roles: readonly ChildRole[],
  perm: number,
  shared: number,
  writable: boolean,
): { perm: number; shared: number } {
  if (roles.includes('cow')) {
    // A backing file is only read; writes and resizes of it are allowed only when the
    // parents cope with changing data.
    let s = shared & BLK_PERM_WRITE ? BLK_PERM_WRITE | BLK_PERM_RESIZE : 0;
    s |= BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED;
    return { perm: perm & BLK_PERM_CONSISTENT_READ, shared: s };
  }
  // What the parents want passes through; a filtered child (a filter's, or raw's without
  // offset or size) gets exactly that, storage (data, metadata) more below.
  let p = perm & PASSTHROUGH;
  let s = shared & PASSTHROUGH;
  if (roles.includes('filtered')) return { perm: p, shared: s };
  if (roles.includes('metadata')) {
    // A format touches its metadata even when nobody writes guest data, and nobody else may
    // write under it.
    if (writable) p |= BLK_PERM_WRITE | BLK_PERM_RESIZE;
    p |= BLK_PERM_CONSISTENT_READ;
    s &= ~(BLK_PERM_WRITE | BLK_PERM_RESIZE);
  }
  if (roles.includes('data')) {
    // The format may assume the size it knows (nobody else resizes), may have to write
    // even an unchanged write (copy on read allocates), and grows the file by writing past
    // its end.
    s &= ~BLK_PERM_RESIZE;
    if (p & BLK_PERM_WRITE_UNCHANGED) p |= BLK_PERM_WRITE;
    if (p & BLK_PERM_WRITE) p |= BLK_PERM_RESIZE;
  }
  return { perm: p, shared: s };
}
