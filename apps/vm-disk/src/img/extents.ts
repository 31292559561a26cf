// Block status read ahead: asked for in large answers (up to the backend's maxExtents in
// one call) and consumed in pieces, so that walking an image costs one block status call
// per many extents rather than one per request. Offsets asked for only move forward.
import type { BlockBackend, Extent } from '@vmdisk/block-graph';

export class ExtentCursor {
  private extents: Extent[] = [];
  /** The index of the extent at `at`. */
  private index = 0;
  private at = 0;

  constructor(
    private readonly backend: BlockBackend,
    private readonly end: number,
  ) {}

  /** current(offset) when the extents read ahead cover it (no call, nothing awaited). */
  peek(offset: number): Extent | undefined {
    if (offset < this.at) return undefined;
    this.skipTo(offset);
    if (this.index >= this.extents.length) return undefined;
    const e = this.extents[this.index]!;
    return { ...e, length: this.at + e.length - offset };
  }

  /** The extent at `offset` (at or past the last one asked for), from `offset` on. */
  async current(offset: number): Promise<Extent> {
    const ahead = this.peek(offset);
    if (ahead) return ahead;
    this.at = offset;
    this.index = 0;
    this.extents = await this.backend.blockStatus(offset, this.end - offset);
    const e = this.extents[0]!;
    return { ...e, length: this.at + e.length - offset };
  }

  private skipTo(offset: number): void {
    while (
      this.index < this.extents.length &&
      this.at + this.extents[this.index]!.length <= offset
    ) {
      this.at += this.extents[this.index]!.length;
      this.index++;
    }
  }
}
