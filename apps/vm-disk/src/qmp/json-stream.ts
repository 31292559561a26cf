// Splits a byte stream into top-level JSON texts, as QEMU's JSON streamer does for QMP:
// objects may span lines or share one; whitespace between them is ignored. Strings and
// escapes are tracked so that braces inside strings do not count. The scan works on bytes
// (JSON's structural characters are ASCII, and no byte of a multi-byte UTF-8 sequence is
// ASCII) and only a complete text is decoded, so that memory stays bounded: a text larger
// than `maxBytes`, or nested deeper than `maxNesting`, is reported as an error as soon as it
// crosses the limit, and what follows of it is discarded up to the next newline (a JSON
// string cannot hold a raw newline, so a newline ends the offending text's line).

export type JsonStreamItem = { text: string } | { error: string };

/** QEMU's limits (qobject/json-streamer.c): MAX_NESTING; its token size limit is 64 MiB. */
export const JSON_MAX_NESTING = 1024;

const NL = 0x0a;
const SPACE = new Set([0x20, 0x09, 0x0d, NL]);
const OPEN = new Set([0x7b, 0x5b]); // { [
const CLOSE = new Set([0x7d, 0x5d]); // } ]
const QUOTE = 0x22;
const BACKSLASH = 0x5c;

export class JsonStreamSplitter {
  /** The pieces of the text being gathered (bytes since its start). */
  private parts: Buffer[] = [];
  private size = 0;
  private inText = false;
  /** A bare scalar (or garbage) runs to the next whitespace or bracket. */
  private bare = false;
  private depth = 0;
  private inString = false;
  private escaped = false;
  private skipToNewline = false;

  constructor(
    private readonly maxBytes = 1 << 20,
    private readonly maxNesting = JSON_MAX_NESTING,
  ) {}

  /** Feeds a chunk; returns the complete texts (and errors) it finished, in order. */
  push(chunk: Buffer): JsonStreamItem[] {
    const out: JsonStreamItem[] = [];
    let start = 0; // where the current text begins in this chunk
    for (let i = 0; i < chunk.length; i++) {
      const c = chunk[i] as number;
      if (this.skipToNewline) {
        const nl = chunk.indexOf(NL, i);
        if (nl < 0) break;
        this.skipToNewline = false;
        i = nl;
        continue;
      }
      if (!this.inText) {
        if (SPACE.has(c)) continue;
        this.inText = true;
        // A top-level string is a scalar too, but may hold spaces and brackets.
        this.bare = !OPEN.has(c) && c !== QUOTE;
        this.inString = c === QUOTE;
        this.depth = OPEN.has(c) ? 1 : 0;
        start = i;
        continue;
      }
      let end = -1; // the text ends before (bare) or at (brackets) this byte
      if (this.bare) {
        if (SPACE.has(c) || OPEN.has(c)) end = i;
      } else if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === BACKSLASH) this.escaped = true;
        else if (c === QUOTE) {
          this.inString = false;
          if (this.depth === 0) end = i + 1;
        }
      } else if (c === QUOTE) this.inString = true;
      else if (OPEN.has(c)) {
        if (++this.depth > this.maxNesting) {
          this.fail(out, 'JSON nesting depth limit exceeded', c);
          continue;
        }
      } else if (CLOSE.has(c) && --this.depth === 0) end = i + 1;

      if (end >= 0) {
        if (this.size + end - start > this.maxBytes) {
          this.fail(out, 'JSON token size limit exceeded', c);
          continue;
        }
        this.parts.push(chunk.subarray(start, end));
        out.push({ text: Buffer.concat(this.parts).toString('utf8') });
        this.reset();
        if (end === i) i--; // a bare scalar's terminator starts what follows
        continue;
      }
      if (this.size + i + 1 - start > this.maxBytes) {
        this.fail(out, 'JSON token size limit exceeded', c);
      }
    }
    if (this.inText) {
      // Keep a copy of the partial text, not a view that would pin the whole chunk.
      const rest = chunk.subarray(start);
      this.parts.push(Buffer.from(rest));
      this.size += rest.length;
    }
    return out;
  }

  /** Reports the text being gathered as an error and discards the rest of its line. */
  private fail(out: JsonStreamItem[], error: string, c: number): void {
    out.push({ error });
    this.reset();
    this.skipToNewline = c !== NL;
  }

  private reset(): void {
    this.parts = [];
    this.size = 0;
    this.inText = false;
    this.bare = false;
    this.depth = 0;
    this.inString = false;
    this.escaped = false;
  }
}
