// One virtio-blk request (virtio 1.1, 5.2.6): the header the guest wrote, its data in
// guest memory, the status byte. Data moves between the guest's pages and the target
// directly: a read fills views of guest memory, a write hands them to the target.
import type { ExportTarget } from '@vmdisk/nbd';
import { VhostUserError } from './errors.ts';
import {
  BLK_DWZ_SEGMENT_SIZE,
  BLK_ID_BYTES,
  BLK_OUTHDR_SIZE,
  BLK_S_IOERR,
  BLK_S_OK,
  BLK_S_UNSUPP,
  BLK_T,
  BLK_WRITE_ZEROES_FLAG_UNMAP,
  MAX_DISCARD_SECTORS,
  MAX_WRITE_ZEROES_SECTORS,
  SECTOR_SIZE,
} from './protocol.ts';
import type { VirtqElement } from './virtqueue.ts';

export interface BlkDevice {
  target: ExportTarget;
  writable: boolean;
  /** The logical block size: requests must be aligned to it. */
  blkSize: number;
  /** GET_ID's answer (NUL-padded to 20 bytes). */
  serial: string;
  /**
   * The write cache, as qemu-storage-daemon 7.2's BlockBackend and config space: writeback
   * off makes each write durable when it completes (FUA); it starts as the export's
   * writethrough option says, and the guest's CONFIG_WCE write sets it. `wce` is what the
   * config space says, write-through (false) until the guest writes it.
   */
  cache: { writeback: boolean; wce: boolean };
  /** A request answered with an error status (logged by the server). */
  onRequestError(err: VhostUserError): void;
}

/** The largest piece handed to the target in one call. */
const MAX_CHUNK = 32 * 1024 * 1024;

/** Bytes [skip, end) of a list of buffers, as views (no copy). */
function slice(bufs: readonly Uint8Array[], skip: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const b of bufs) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    out.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return out;
}

function total(bufs: readonly Uint8Array[]): number {
  let n = 0;
  for (const b of bufs) n += b.length;
  return n;
}

/** The first `n` bytes of `bufs` (the header, a discard segment): copied only when split. */
function gather(bufs: readonly Uint8Array[], n: number): Uint8Array {
  const first = bufs[0];
  if (first !== undefined && first.length >= n) return first;
  const out = new Uint8Array(n);
  let at = 0;
  for (const b of bufs) {
    if (at >= n) break;
    const k = Math.min(n - at, b.length);
    out.set(b.subarray(0, k), at);
    at += k;
  }
  return out;
}

/** Little-endian u32 at `at` (guest memory: no DataView made for each request). */
function le32(b: Uint8Array, at: number): number {
  return (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16)) + b[at + 3]! * 0x1000000;
}

/** Little-endian u64 at `at` as a number (exact below 2^53; larger ones are out of range). */
function le64(b: Uint8Array, at: number): number {
  return le32(b, at) + le32(b, at + 4) * 0x100000000;
}

const FUA = Object.freeze({ fua: true });
const NO_FUA = Object.freeze({ fua: false });

/**
 * Merges buffers adjacent in memory (the guest's contiguous pages) and cuts pieces at
 * MAX_CHUNK: one target call each, at consecutive offsets.
 */
function pieces(bufs: readonly Uint8Array[]): Uint8Array[] {
  const out: Uint8Array[] = [];
  let cur: Uint8Array | undefined;
  for (const b of bufs) {
    if (
      cur &&
      cur.buffer === b.buffer &&
      cur.byteOffset + cur.length === b.byteOffset &&
      cur.length + b.length <= MAX_CHUNK
    ) {
      cur = new Uint8Array(cur.buffer, cur.byteOffset, cur.length + b.length);
    } else {
      if (cur) out.push(cur);
      cur = b;
    }
    while (cur.length > MAX_CHUNK) {
      out.push(cur.subarray(0, MAX_CHUNK));
      cur = cur.subarray(MAX_CHUNK);
    }
  }
  if (cur) out.push(cur);
  return out;
}

/** The buffers the guest reads: its writable ones but the status byte (the last one). */
function dataInOf(inBufs: readonly Uint8Array[]): Uint8Array[] {
  const last = inBufs[inBufs.length - 1]!;
  const data = inBufs.slice(0, -1);
  if (last.length > 1) data.push(last.subarray(0, last.length - 1));
  return data;
}

class BadRequest extends Error {
  readonly status: number;

  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

/**
 * Runs the request: writes its status byte and returns used.len, which is, as
 * qemu-storage-daemon gives it, the size of all the guest's writable buffers whatever the
 * outcome. The caller checked that the last descriptor is writable and mapped.
 */
export async function processBlkRequest(dev: BlkDevice, el: VirtqElement): Promise<number> {
  const inBufs = el.in;
  const inLen = total(inBufs);
  const last = inBufs[inBufs.length - 1]!;
  const statusAt = last.length - 1;
  try {
    if (el.badAddress) throw new BadRequest(BLK_S_IOERR, 'a buffer is outside guest memory');
    const out = el.out;
    if (total(out) < BLK_OUTHDR_SIZE) {
      throw new BadRequest(BLK_S_IOERR, 'virtio-blk request outhdr too short');
    }
    const hdr = gather(out, BLK_OUTHDR_SIZE);
    const type = le32(hdr, 0);
    const sector = le64(hdr, 8);
    switch (type) {
      case BLK_T.IN: {
        const t = dev.target;
        // One data buffer, the status byte in a buffer of its own (as Linux guests lay
        // 4 KiB requests out): no lists made for it.
        const one = inBufs.length === 2 && last.length === 1 ? inBufs[0]! : undefined;
        if (one !== undefined && one.length <= MAX_CHUNK) {
          await t.read(checkRange(dev, sector, one.length), one);
          break;
        }
        const data = dataInOf(inBufs);
        const offset = checkRange(dev, sector, total(data));
        await transfer(pieces(data), offset, (o, b) => t.read(o, b));
        break;
      }
      case BLK_T.OUT: {
        const t = dev.target;
        if (!dev.writable || !t.write)
          throw new BadRequest(BLK_S_IOERR, 'write to a read-only export');
        const flags = dev.cache.writeback ? NO_FUA : FUA;
        // The header, then one data buffer.
        const one = out.length === 2 && out[0]!.length === BLK_OUTHDR_SIZE ? out[1]! : undefined;
        if (one !== undefined && one.length <= MAX_CHUNK) {
          await t.write(checkRange(dev, sector, one.length), one, flags);
          break;
        }
        const dataOut = slice(out, BLK_OUTHDR_SIZE);
        const offset = checkRange(dev, sector, total(dataOut));
        await transfer(pieces(dataOut), offset, (o, b) => t.write!(o, b, flags));
        break;
      }
      case BLK_T.FLUSH:
        await dev.target.flush?.();
        break;
      case BLK_T.GET_ID: {
        const id = new Uint8Array(BLK_ID_BYTES);
        id.set(Buffer.from(dev.serial).subarray(0, BLK_ID_BYTES));
        let at = 0;
        for (const b of dataInOf(inBufs)) {
          const n = Math.min(b.length, BLK_ID_BYTES - at);
          b.set(id.subarray(at, at + n));
          at += n;
        }
        break;
      }
      case BLK_T.DISCARD:
      case BLK_T.WRITE_ZEROES:
        await discardOrZero(dev, type, slice(out, BLK_OUTHDR_SIZE));
        break;
      default:
        throw new BadRequest(BLK_S_UNSUPP, `unsupported request type ${type}`);
    }
    last[statusAt] = BLK_S_OK;
  } catch (e) {
    if (e instanceof BadRequest) {
      last[statusAt] = e.status;
      dev.onRequestError(new VhostUserError('ERR_VMDISK_VHOST_BAD_REQUEST', e.message));
    } else {
      last[statusAt] = BLK_S_IOERR;
      dev.onRequestError(
        new VhostUserError(
          'ERR_VMDISK_VHOST_TARGET_ERROR',
          `target failed: ${e instanceof Error ? e.message : String(e)}`,
          { cause: e },
        ),
      );
    }
  }
  return inLen;
}

/** The byte offset of a request of `length` bytes at `sector`, or IOERR out of range. */
function checkRange(dev: BlkDevice, sector: number, length: number): number {
  const offset = sector * SECTOR_SIZE;
  if (offset % dev.blkSize !== 0 || length % dev.blkSize !== 0) {
    throw new BadRequest(BLK_S_IOERR, `request not aligned to ${dev.blkSize} bytes`);
  }
  if (sector > Number.MAX_SAFE_INTEGER / SECTOR_SIZE || offset + length > dev.target.size()) {
    throw new BadRequest(BLK_S_IOERR, 'request beyond the end of the disk');
  }
  return offset;
}

async function transfer(
  bufs: Uint8Array[],
  offset: number,
  io: (offset: number, buf: Uint8Array) => Promise<void>,
): Promise<void> {
  const ios: Promise<void>[] = [];
  for (const b of bufs) {
    ios.push(io(offset, b));
    offset += b.length;
  }
  await Promise.all(ios);
}

async function discardOrZero(dev: BlkDevice, type: number, dataOut: Uint8Array[]): Promise<void> {
  if (!dev.writable)
    throw new BadRequest(BLK_S_IOERR, 'discard or write zeroes on a read-only export');
  // One segment only: max_discard_seg and max_write_zeroes_seg are 1.
  if (total(dataOut) !== BLK_DWZ_SEGMENT_SIZE) {
    throw new BadRequest(BLK_S_UNSUPP, 'discard/write zeroes: not exactly one segment');
  }
  const seg = gather(dataOut, BLK_DWZ_SEGMENT_SIZE);
  const sector = le64(seg, 0);
  const sectors = le32(seg, 8);
  const flags = le32(seg, 12);
  const zero = type === BLK_T.WRITE_ZEROES;
  if (flags & ~(zero ? BLK_WRITE_ZEROES_FLAG_UNMAP : 0)) {
    throw new BadRequest(BLK_S_UNSUPP, `discard/write zeroes: flags ${flags}`);
  }
  if (sectors > (zero ? MAX_WRITE_ZEROES_SECTORS : MAX_DISCARD_SECTORS)) {
    throw new BadRequest(BLK_S_IOERR, `discard/write zeroes of ${sectors} sectors: too many`);
  }
  const length = sectors * SECTOR_SIZE;
  const offset = checkRange(dev, sector, length);
  if (length === 0) return;
  const t = dev.target;
  if (!zero) {
    await t.trim?.(offset, length, {});
  } else if (t.writeZeroes) {
    await t.writeZeroes(offset, length, {
      noHole: !(flags & BLK_WRITE_ZEROES_FLAG_UNMAP),
      fua: !dev.cache.writeback,
    });
  } else if (t.write) {
    await t.write(offset, new Uint8Array(length), { fua: !dev.cache.writeback });
  } else {
    throw new BadRequest(BLK_S_IOERR, 'write zeroes to a read-only target');
  }
}
