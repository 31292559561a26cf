// The option schema: one definition, two syntaxes (JSON typed, keyval converted as QEMU's
// keyval visitor converts), QEMU's words with dotted paths, inferred types, QAPI shapes.
import { describe, expect, expectTypeOf, it } from 'vitest';
import { type Infer, type OptionSyntax, schema } from '../src/index.ts';

const { bool, enumOf, int, list, opt, size, str, struct, uint32, union } = schema;

function message(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
  return 'no error';
}

const address = union('type', {}, { inet: { host: str, port: str }, unix: { path: str } });
const server = struct({
  addr: address,
  'max-connections': opt(uint32),
  writable: opt(bool, false),
  budget: opt(size),
  mode: opt(enumOf(['safe', 'hard'])),
  tags: opt(list(str)),
});

describe('option schema', () => {
  it('infers the checked options type from the definition', () => {
    type Server = Infer<typeof server>;
    expectTypeOf<Server['writable']>().toEqualTypeOf<boolean>();
    expectTypeOf<Server['max-connections']>().toEqualTypeOf<number | undefined>();
    expectTypeOf<Server['mode']>().toEqualTypeOf<'safe' | 'hard' | undefined>();
    expectTypeOf<Server['addr']>().toEqualTypeOf<
      { type: 'inet'; host: string; port: string } | { type: 'unix'; path: string }
    >();
    const v = server.parse({ addr: { type: 'unix', path: '/s' } }, '', 'json');
    expect(v).toEqual({ addr: { type: 'unix', path: '/s' }, writable: false });
  });

  it("takes QEMU's boolean spellings in keyval only; JSON is typed", () => {
    const parse = (v: unknown, syntax: OptionSyntax) => bool.parse(v, 'writable', syntax);
    for (const s of ['on', 'yes', 'true', 'y']) expect(parse(s, 'keyval')).toBe(true);
    for (const s of ['off', 'no', 'false', 'n']) expect(parse(s, 'keyval')).toBe(false);
    for (const s of ['ON', 'Yes', '1', '0', '']) {
      expect(message(() => parse(s, 'keyval'))).toBe("Parameter 'writable' expects 'on' or 'off'");
    }
    expect(message(() => parse('on', 'json'))).toBe(
      "Invalid parameter type for 'writable', expected: boolean",
    );
    expect(parse(true, 'json')).toBe(true);
  });

  it("names the key by its dotted path, in QEMU's words and order", () => {
    const check = (v: unknown, syntax: OptionSyntax = 'json') =>
      message(() => server.parse(v, '', syntax));
    expect(check({})).toBe("Parameter 'addr' is missing");
    expect(check({ addr: { type: 'inet', host: 'h' } })).toBe("Parameter 'addr.port' is missing");
    // An enum's value is refused naming the member alone, as QEMU's visitor does.
    expect(check({ addr: { type: 'vsock' } })).toBe(
      "Parameter 'type' does not accept value 'vsock'",
    );
    // Unknown members last, after every known one is checked.
    expect(check({ bogus: 1, addr: { type: 'unix', path: '/s' }, writable: 'x' })).toBe(
      "Invalid parameter type for 'writable', expected: boolean",
    );
    expect(check({ bogus: 1, addr: { type: 'unix', path: '/s', x: 1 } })).toBe(
      "Parameter 'addr.x' is unexpected",
    );
    const kv = (v: Record<string, unknown>) =>
      check({ addr: { type: 'unix', path: '/s' }, ...v }, 'keyval');
    expect(kv({ 'max-connections': '-1' })).toBe("Parameter 'max-connections' expects uint32_t");
    expect(kv({ 'max-connections': 'x' })).toBe("Parameter 'max-connections' expects integer");
    expect(kv({ budget: '1Q' })).toBe("Parameter 'budget' expects size");
    expect(
      server.parse({ addr: { type: 'unix', path: '/s' }, budget: '1M' }, '', 'keyval').budget,
    ).toBe(1 << 20);
    expect(kv({ tags: { 0: 'a', 1: 5 } })).toBe(
      "Invalid parameter type for 'tags[1]', expected: string",
    );
    expect(message(() => int({ min: 1 }).parse(0, 'align', 'json'))).toBe(
      "Invalid option 'align': 0 is less than 1",
    );
  });

  it("keeps QAPI's shape for query-qmp-schema", () => {
    expect(address.info).toEqual({
      meta: 'object',
      members: [
        { name: 'type', type: { meta: 'enum', values: ['inet', 'unix'] }, optional: false },
      ],
      tag: 'type',
      variants: {
        inet: [
          { name: 'host', type: { meta: 'builtin', name: 'str' }, optional: false },
          { name: 'port', type: { meta: 'builtin', name: 'str' }, optional: false },
        ],
        unix: [{ name: 'path', type: { meta: 'builtin', name: 'str' }, optional: false }],
      },
    });
    expect(
      server.info.meta === 'object' && server.info.members.map((m) => [m.name, m.optional]),
    ).toEqual([
      ['addr', false],
      ['max-connections', true],
      ['writable', true],
      ['budget', true],
      ['mode', true],
      ['tags', true],
    ]);
  });
});
