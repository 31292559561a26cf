// The `null-co` protocol driver: reads zeros (unless read-zeroes is false, then it leaves
// the buffer alone), writes go nowhere, an optional latency per request.

import { defineDriver, type ProtocolInstance, type ProtocolStatus } from '../driver.ts';
import { bool, int, opt } from '../schema.ts';

class NullInstance implements ProtocolInstance {
  readonly kind = 'protocol';

  private readonly length: number;
  private readonly latencyMs: number;
  private readonly readZeroes: boolean;

  constructor(length: number, latencyMs: number, readZeroes: boolean) {
    this.length = length;
    this.latencyMs = latencyMs;
    this.readZeroes = readZeroes;
  }

  size(): number {
    return this.length;
  }

  private delay(): Promise<void> {
    if (this.latencyMs === 0) return Promise.resolve();
    return new Promise((resolve) => setTimeout(resolve, this.latencyMs));
  }

  async pread(buf: Uint8Array): Promise<void> {
    await this.delay();
    if (this.readZeroes) buf.fill(0);
  }

  pwrite(): Promise<void> {
    return this.delay();
  }

  flush(): Promise<void> {
    return this.delay();
  }

  writeZeroes(): Promise<void> {
    return this.delay();
  }

  discard(): Promise<void> {
    return this.delay();
  }

  async blockStatus(_offset: number, length: number): Promise<ProtocolStatus> {
    return { length, hole: false, zero: this.readZeroes };
  }
}

export const nullCoDriver = defineDriver({
  name: 'null-co',
  options: {
    size: opt(int({ min: 0 })),
    'latency-ns': opt(int({ min: 0 })),
    'read-zeroes': opt(bool),
  },
  async open(ctx) {
    const o = ctx.options;
    // Request buffers from the engine's arena, reused, rather than a new Buffer each (see
    // the rbd driver): a benchmark of the NBD layer on null-co measures the layer, not page
    // faults.
    await ctx.engine('auto');
    return new NullInstance(
      o.size ?? 1 << 30,
      Math.ceil((o['latency-ns'] ?? 0) / 1e6),
      o['read-zeroes'] ?? true,
    );
  },
});
