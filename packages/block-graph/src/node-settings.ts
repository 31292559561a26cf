// The settings of a node (QEMU's BDRV_O_* flags and the options behind them), set when it
// opens; children inherit some (graph-open.ts).

export interface NodeSettings {
  readOnly: boolean;
  direct: boolean;
  noFlush: boolean;
  discard: 'ignore' | 'unmap';
  detectZeroes: 'off' | 'on' | 'unmap';
  /** Fall back to read-only when the storage cannot be opened for writing. */
  autoReadOnly: boolean;
  /**
   * force-share: parents share every permission on this node whatever they would share
   * (read-only nodes only): how qemu-img -U reads an image another process writes.
   */
  forceShare: boolean;
}
