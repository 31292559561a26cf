// Splits a byte stream into top-level JSON texts, as QEMU's JSON streamer does for QMP:
// objects may span lines or share one; whitespace between them is ignored. Strings and
// escapes are tracked so that braces inside strings do not count. A text larger than
// `maxBytes`, or a stray closing bracket, is reported as an error and the stream resyncs
// at the next newline.

export type JsonStreamItem = { text: string } | { error: string };

export class JsonStreamSplitter {
  private buf = '';
  private depth = 0;
  private inString = false;
  private escaped = false;
  private start = -1;
  private scanned = 0;
  private skipToNewline = false;

  constructor(private readonly maxBytes = 1 << 20) {}

  /** Feeds a chunk; returns the complete texts (and errors) it finished, in order. */
  push(chunk: string): JsonStreamItem[] {
    const out: JsonStreamItem[] = [];
    this.buf += chunk;
    let i = this.scanned;
    for (; i < this.buf.length; i++) {
      const c = this.buf[i];
      if (this.skipToNewline) {
        if (c === '\n') this.skipToNewline = false;
        continue;
      }
      if (this.depth === 0 && this.start < 0) {
        if (c === ' ' || c === '\t' || c === '\r' || c === '\n') continue;
        if (c === '{' || c === '[') {
          this.start = i;
          this.depth = 1;
          continue;
        }
        // A bare scalar or garbage: take it up to the next whitespace as one text, so that
        // the JSON parser reports what it is.
        let end = i;
        while (end < this.buf.length && !/[\s{[]/.test(this.buf[end] as string)) end++;
        if (end === this.buf.length) break;
        out.push({ text: this.buf.slice(i, end) });
        i = end - 1;
        continue;
      }
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === '\\') this.escaped = true;
        else if (c === '"') this.inString = false;
        continue;
      }
      if (c === '"') this.inString = true;
      else if (c === '{' || c === '[') this.depth++;
      else if (c === '}' || c === ']') {
        this.depth--;
        if (this.depth === 0) {
          out.push({ text: this.buf.slice(this.start, i + 1) });
          this.start = -1;
        }
      }
      if (this.start >= 0 && i - this.start > this.maxBytes) {
        out.push({ error: `JSON text longer than ${this.maxBytes} bytes` });
        this.reset();
        this.skipToNewline = true;
      }
    }
    // Drop what has been consumed; keep a partial text.
    const keepFrom = this.start >= 0 ? this.start : Math.min(i, this.buf.length);
    this.buf = this.buf.slice(keepFrom);
    this.scanned = i - keepFrom;
    if (this.start >= 0) this.start = 0;
    return out;
  }

  private reset(): void {
    this.depth = 0;
    this.inString = false;
    this.escaped = false;
    this.start = -1;
  }
}
