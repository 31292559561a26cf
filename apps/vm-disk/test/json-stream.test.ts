// The QMP stream splitter on its own: texts split at any byte (inside strings, escapes and
// multi-byte UTF-8 sequences), the limits, and resynchronising at the next newline.
import { describe, expect, it } from 'vitest';
import { type JsonStreamItem, JsonStreamSplitter } from '../src/qmp/json-stream.ts';

function feed(splitter: JsonStreamSplitter, input: Buffer, step: number): JsonStreamItem[] {
  const out: JsonStreamItem[] = [];
  for (let i = 0; i < input.length; i += step) {
    out.push(...splitter.push(input.subarray(i, i + step)));
  }
  return out;
}

describe('JsonStreamSplitter', () => {
  it('finds the same texts whatever the chunk size', () => {
    const input = Buffer.from(
      '{"a":"}{ \\" ]","é":"日本"}  [1,{"b":[2]}]\n"a string { with [ brackets"\n42 true\n' +
        '{"x":\n 1}{"y":2}\n',
    );
    const want = [
      '{"a":"}{ \\" ]","é":"日本"}',
      '[1,{"b":[2]}]',
      '"a string { with [ brackets"',
      '42',
      'true',
      '{"x":\n 1}',
      '{"y":2}',
    ].map((text) => ({ text }));
    for (const step of [1, 2, 3, 7, input.length]) {
      expect(feed(new JsonStreamSplitter(), input, step), `step ${step}`).toEqual(want);
    }
  });

  it('refuses a text over the size limit at once and resumes after the next newline', () => {
    const splitter = new JsonStreamSplitter(64);
    expect(splitter.push(Buffer.from(`{"a":"${'x'.repeat(100)}`))).toEqual([
      { error: 'JSON token size limit exceeded' },
    ]);
    // The rest of the line (even what looks like JSON) is dropped, unbuffered.
    expect(splitter.push(Buffer.from(`${'y'.repeat(1000)}"} {"b":1}`))).toEqual([]);
    expect(splitter.push(Buffer.from('\n{"c":2}\n'))).toEqual([{ text: '{"c":2}' }]);
    // A text of exactly the limit passes.
    const exact = `{"a":"${'z'.repeat(64 - 8)}"}`;
    expect(exact.length).toBe(64);
    expect(splitter.push(Buffer.from(`${exact}\n`))).toEqual([{ text: exact }]);
    expect(splitter.push(Buffer.from(`${'w'.repeat(65)} {"d":3}\n`))).toEqual([
      { error: 'JSON token size limit exceeded' },
    ]);
  });

  it("refuses nesting deeper than QEMU's 1024", () => {
    const splitter = new JsonStreamSplitter();
    const ok = `${'['.repeat(1024)}${']'.repeat(1024)}`;
    expect(splitter.push(Buffer.from(`${ok}\n`))).toEqual([{ text: ok }]);
    expect(splitter.push(Buffer.from(`${'['.repeat(1025)}${']'.repeat(1025)}\n{}`))).toEqual([
      { error: 'JSON nesting depth limit exceeded' },
      { text: '{}' },
    ]);
  });
});
