// qemu-img's -p progress (util/qemu-progress.c): "    (12.00/100%)\r" on stdout, drawn at
// 0, at 100 and whenever it moved past the last drawn value by more than `minSkip`
// percent (convert 1, compare 2), in single-precision as qemu-img computes it, and ended
// by a newline; the same progress is logged as structured events (debug level).
import type { Logger } from '../log.ts';

const f = Math.fround;

/** printf("%0.2f"): the exact value rounded, ties to even (JS toFixed rounds them up). */
export function percent(v: number): string {
  const s = v * 100;
  if (Number.isInteger(s * 2) && !Number.isInteger(s)) {
    const n = Math.floor(s) % 2 === 0 ? Math.floor(s) : Math.ceil(s);
    return (n / 100).toFixed(2);
  }
  return v.toFixed(2);
}

export class ImgProgress {
  private current = 0;
  private lastPrint = 0;
  private lastLogged = -1;

  constructor(
    private readonly out: NodeJS.WritableStream,
    private readonly enabled: boolean,
    private readonly log: Logger | undefined,
    private readonly command: string,
    private readonly minSkip = 1,
  ) {}

  /** Draws 0% (qemu-img does once its images are open). */
  start(): void {
    this.set(0);
  }

  /** Progress by `bytes` of `base` more (compare's accounting). */
  advance(bytes: number, base: number): void {
    const delta = f(f(f(bytes) / f(base)) * 100);
    this.set(f(this.current + f(f(delta / 100) * 100)));
  }

  /** Progress by `delta` percent more (rebase's accounting: qemu_progress_print(delta, 100)). */
  add(delta: number): void {
    // Drawn at most 100 (qemu-img rebase's last chunk may go past it).
    this.set(Math.min(100, f(this.current + f(f(delta / 100) * 100))));
  }

  /** Progress as `done` of `total` (convert's accounting). */
  update(done: number, total: number): void {
    this.set(total > 0 ? f((100 * done) / total) : 100);
  }

  private set(current: number): void {
    this.current = current;
    if (current > this.lastPrint + this.minSkip || current === 100 || current === 0) {
      this.lastPrint = current;
      if (this.enabled) this.out.write(`    (${percent(current)}/100%)\r`);
    }
    const tenth = Math.floor(current / 10);
    if (this.log && tenth > this.lastLogged) {
      this.lastLogged = tenth;
      this.log.debug(
        { event: 'progress', command: this.command, percent: Number(current.toFixed(2)) },
        'progress',
      );
    }
  }

  /** Ends the line qemu-img's way (after the command's last message). */
  end(): void {
    if (this.enabled) this.out.write('\n');
  }
}
