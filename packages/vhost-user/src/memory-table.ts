// The guest's memory as SET_MEM_TABLE gives it: regions, each an fd mmapped here (its
// mmap_offset included), and views over them without copy. Descriptors carry guest
// physical addresses; the vring addresses of SET_VRING_ADDR are the front-end's own
// virtual addresses: both translate here. Requests hold the table they use (acquire/
// release): a replaced or closed table is unmapped only when the last of them is done,
// so that no view is ever read after munmap.
import { VhostUserError } from './errors.ts';
import { closeFd, mmapShared, munmap, view } from './native.ts';

export interface MemoryRegionDesc {
  guestPhysAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

interface Region extends MemoryRegionDesc {
  gpa: number;
  uva: number;
  length: number;
  map: bigint;
  mapLength: number;
  bytes: Uint8Array;
}

/** Sizes in this table fit in a double exactly: guest memory is far below 2^53. */
export class MemoryTable {
  private readonly regions: Region[] = [];
  private users = 0;
  private closed = false;

  /** Maps each region's fd (the fds are closed here, mapped or not). */
  constructor(descs: readonly MemoryRegionDesc[], fds: readonly number[]) {
    try {
      descs.forEach((d, i) => {
        const fd = fds[i]!;
        const mapLength = Number(d.size + d.mmapOffset);
        const map = mmapShared(fd, mapLength, 0n);
        if (typeof map === 'number') {
          throw new VhostUserError(
            'ERR_VMDISK_VHOST_MMAP_FAILED',
            `mmap of memory region ${i} (${mapLength} bytes) failed: errno ${-map}`,
          );
        }
        const length = Number(d.size);
        const bytes = new Uint8Array(view(map, mapLength), Number(d.mmapOffset), length);
        this.regions.push({
          ...d,
          gpa: Number(d.guestPhysAddr),
          uva: Number(d.userAddr),
          length,
          map,
          mapLength,
          bytes,
        });
      });
    } catch (e) {
      this.unmap();
      throw e;
    } finally {
      for (const fd of fds) closeFd(fd);
    }
  }

  get regionCount(): number {
    return this.regions.length;
  }

  /** Bytes [gpa, gpa + length) of guest memory, or null when not all in one region. */
  guest(gpa: number, length: number): Uint8Array | null {
    for (const r of this.regions) {
      const at = gpa - r.gpa;
      if (at >= 0 && at < r.length) {
        return at + length <= r.length ? r.bytes.subarray(at, at + length) : null;
      }
    }
    return null;
  }

  /**
   * Bytes [gpa, gpa + length) as pieces, one per region crossed, appended to `out`; false
   * when any byte is outside the table.
   */
  guestPieces(gpa: number, length: number, out: Uint8Array[]): boolean {
    while (length > 0) {
      const r = this.regionAt(gpa);
      if (!r) return false;
      const at = gpa - r.gpa;
      const n = Math.min(length, r.length - at);
      out.push(r.bytes.subarray(at, at + n));
      gpa += n;
      length -= n;
    }
    return true;
  }

  private regionAt(gpa: number): Region | undefined {
    // A loop, not find(): this runs for each descriptor of each request.
    for (const r of this.regions) if (gpa >= r.gpa && gpa - r.gpa < r.length) return r;
    return undefined;
  }

  /** Bytes at a front-end virtual address (the vring addresses), or null. */
  frontEnd(uva: number, length: number): Uint8Array | null {
    for (const r of this.regions) {
      const at = uva - r.uva;
      if (at >= 0 && at + length <= r.length) return r.bytes.subarray(at, at + length);
    }
    return null;
  }

  acquire(): void {
    this.users++;
  }

  release(): void {
    this.users--;
    if (this.closed && this.users === 0) this.unmap();
  }

  /** Unmaps now, or when the last request holding the table is done. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.users === 0) this.unmap();
  }

  private unmap(): void {
    for (const r of this.regions.splice(0)) munmap(r.map, r.mapLength);
  }
}
