// A QMP session for side-by-side tests of block jobs: it records every reply and event in
// order (timestamps aside), so that the same sequence on qemu-storage-daemon and on
// vm-disk can be compared as a whole; and the daemons' common command line.
import { type QmpMessage, QmpTestClient } from './qmp-client.ts';

/** A message as compared: without its timestamp. */
export const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage => rest;

/** The arguments that give either daemon a QMP monitor on `qmp`. */
export const monitorArgs = (qmp: string): string[] => [
  '--chardev',
  `socket,id=m0,path=${qmp},server=on,wait=off`,
  '--monitor',
  'chardev=m0',
];

export class Recorder {
  readonly seen: QmpMessage[] = [];
  readonly client: QmpTestClient;
  private readonly bare: (m: QmpMessage) => QmpMessage;
  private constructor(client: QmpTestClient, normalize: (m: QmpMessage) => QmpMessage) {
    this.client = client;
    this.bare = normalize;
  }

  /** A session on `qmp` that records messages as `normalize` makes them. */
  static async open(qmp: string, normalize = bare): Promise<Recorder> {
    const { client } = await QmpTestClient.connect(qmp);
    await client.execute({ execute: 'qmp_capabilities' });
    return new Recorder(client, normalize);
  }

  /** Sends a command; records the events before its reply and the reply (minus `drop` keys of each job). */
  async cmd(
    execute: string,
    args?: Record<string, unknown>,
    drop: string[] = [],
  ): Promise<QmpMessage> {
    this.client.sendRaw(`${JSON.stringify({ execute, ...(args && { arguments: args }) })}\n`);
    for (;;) {
      const m = this.bare(await this.client.next(30_000));
      if ('event' in m) {
        this.seen.push(m);
        continue;
      }
      const r = m.return;
      if (Array.isArray(r) && drop.length > 0) {
        m.return = r.map((j: Record<string, unknown>) =>
          Object.fromEntries(Object.entries(j).filter(([k]) => !drop.includes(k))),
        );
      }
      this.seen.push(m);
      return m;
    }
  }

  /** Records events until one matches (and returns it). */
  async until(event: string, status?: string): Promise<QmpMessage> {
    for (;;) {
      const m = this.bare(await this.client.next(30_000));
      this.seen.push(m);
      const data = m.data as { status?: string } | undefined;
      if (m.event === event && (status === undefined || data?.status === status)) return m;
    }
  }
}
