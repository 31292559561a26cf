// Helpers the packages' tests share. Test files only (a devDependency): nothing in any
// package's src/ may import this, and it imports nothing of ours.
export { lockedBytes } from './locks.ts';
export { fillPattern } from './pattern.ts';
export {
  type QemuImgBitmap,
  type QemuImgMapEntry,
  qemuDirtyExtents,
  qemuImgBitmaps,
  qemuImgMap,
} from './qemu-img.ts';
export { QemuIoSession } from './qemu-io.ts';
export { makeCertificates } from './tls.ts';
