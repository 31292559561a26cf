// Facts of the vhost-user protocol (QEMU's docs/interop/vhost-user.rst), of split
// virtqueues (virtio 1.1, 2.6) and of virtio-blk (5.2). All little-endian.

/** Front-end requests (VhostUserRequest). */
export const VHOST_USER = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  RESET_DEVICE: 34,
  GET_MAX_MEM_SLOTS: 36,
} as const;

/** Header: request (u32), flags (u32), size (u32); the payload follows. */
export const HEADER_SIZE = 12;
/** The largest payload of a request we take (a memory table of 8 regions is 264). */
export const MAX_PAYLOAD = 4096;
export const FLAG_VERSION = 0x1;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;
/** At most this many regions in SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_REGIONS = 8;
/** Bit 8 of the u64 of SET_VRING_KICK/CALL/ERR: no fd came with it. */
export const VRING_NOFD_MASK = 0x100;
export const VRING_IDX_MASK = 0xff;

/** Protocol feature bits (VhostUserProtocolFeature). */
export const PROTOCOL_F = {
  MQ: 0,
  REPLY_ACK: 3,
  CONFIG: 9,
} as const;

/** Device feature bits. */
export const F = {
  BLK_SIZE_MAX: 1,
  BLK_SEG_MAX: 2,
  BLK_RO: 5,
  BLK_BLK_SIZE: 6,
  BLK_FLUSH: 9,
  BLK_TOPOLOGY: 10,
  BLK_CONFIG_WCE: 11,
  BLK_MQ: 12,
  BLK_DISCARD: 13,
  BLK_WRITE_ZEROES: 14,
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  PROTOCOL_FEATURES: 30,
  VERSION_1: 32,
} as const;

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** Split virtqueue layout. */
export const VRING_DESC_SIZE = 16;
export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
/** The largest queue size a split virtqueue may have. */
export const VIRTQUEUE_MAX_SIZE = 32768;

/** virtio-blk request types and status bytes. */
export const BLK_T = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  DISCARD: 11,
  WRITE_ZEROES: 13,
} as const;
export const BLK_S_OK = 0;
export const BLK_S_IOERR = 1;
export const BLK_S_UNSUPP = 2;
/** struct virtio_blk_outhdr: type (u32), ioprio (u32), sector (u64). */
export const BLK_OUTHDR_SIZE = 16;
/** struct virtio_blk_discard_write_zeroes: sector (u64), num_sectors (u32), flags (u32). */
export const BLK_DWZ_SEGMENT_SIZE = 16;
export const BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
export const BLK_ID_BYTES = 20;
export const SECTOR_SIZE = 512;
/** qemu-storage-daemon's limits (VIRTIO_BLK_MAX_DISCARD/WRITE_ZEROES_SECTORS, seg_max). */
export const MAX_DISCARD_SECTORS = 32768;
export const MAX_WRITE_ZEROES_SECTORS = 32768;
export const SEG_MAX = 128 - 2;
/** struct virtio_blk_config up to write_zeroes_may_unmap and its padding. */
export const BLK_CONFIG_SIZE = 60;

export interface BlkConfig {
  capacitySectors: bigint;
  blkSize: number;
  numQueues: number;
  /** The write cache is on (the guest then sends FLUSH); off: writes are write-through. */
  writeback: boolean;
}

/** Where virtio_blk_config.writeback is (the one field the guest may write, CONFIG_WCE). */
export const BLK_CONFIG_WRITEBACK_OFFSET = 32;

/** virtio_blk_config as qemu-storage-daemon 7.2 fills it (vu_blk_initialize_config). */
export function encodeBlkConfig(c: BlkConfig): Uint8Array {
  const b = new Uint8Array(BLK_CONFIG_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, c.capacitySectors, true);
  v.setUint32(8, 0, true); // size_max
  v.setUint32(12, SEG_MAX, true);
  v.setUint32(20, c.blkSize, true);
  v.setUint8(24, 0); // physical_block_exp
  v.setUint8(25, 0); // alignment_offset
  v.setUint16(26, 1, true); // min_io_size
  v.setUint32(28, 1, true); // opt_io_size
  v.setUint8(BLK_CONFIG_WRITEBACK_OFFSET, c.writeback ? 1 : 0);
  v.setUint16(34, c.numQueues, true);
  v.setUint32(36, MAX_DISCARD_SECTORS, true);
  v.setUint32(40, 1, true); // max_discard_seg
  v.setUint32(44, c.blkSize / SECTOR_SIZE, true); // discard_sector_alignment
  v.setUint32(48, MAX_WRITE_ZEROES_SECTORS, true);
  v.setUint32(52, 1, true); // max_write_zeroes_seg
  v.setUint8(56, 0); // write_zeroes_may_unmap
  return b;
}

/** The device features offered: qemu-storage-daemon's set, RO when not writable. */
export function blkFeatures(writable: boolean): bigint {
  let f =
    bit(F.VERSION_1) |
    bit(F.PROTOCOL_FEATURES) |
    bit(F.RING_INDIRECT_DESC) |
    bit(F.RING_EVENT_IDX) |
    bit(F.BLK_SEG_MAX) |
    bit(F.BLK_TOPOLOGY) |
    bit(F.BLK_CONFIG_WCE) |
    bit(F.BLK_BLK_SIZE) |
    bit(F.BLK_FLUSH) |
    bit(F.BLK_DISCARD) |
    bit(F.BLK_WRITE_ZEROES) |
    bit(F.BLK_MQ);
  if (!writable) f |= bit(F.BLK_RO);
  return f;
}

export const PROTOCOL_FEATURES =
  bit(PROTOCOL_F.MQ) | bit(PROTOCOL_F.REPLY_ACK) | bit(PROTOCOL_F.CONFIG);
