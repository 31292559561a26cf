import { describe, expect, it } from 'vitest';
import { parseKeyval } from '../src/options/keyval.ts';

describe('QEMU keyval syntax', () => {
  it('parses flat and dotted keys into nested objects', () => {
    expect(parseKeyval('driver=qcow2,node-name=d0,file.driver=file,file.filename=/x.img')).toEqual({
      driver: 'qcow2',
      'node-name': 'd0',
      file: { driver: 'file', filename: '/x.img' },
    });
  });

  it('unescapes doubled commas and keeps = inside values', () => {
    expect(parseKeyval('filename=/a,,b.img,opt=x=y')).toEqual({ filename: '/a,b.img', opt: 'x=y' });
  });

  it('accepts an empty string, a trailing comma and empty values', () => {
    expect(parseKeyval('')).toEqual({});
    expect(parseKeyval('a=1,')).toEqual({ a: '1' });
    expect(parseKeyval('a=')).toEqual({ a: '' });
  });

  it('lets the last of repeated keys win', () => {
    expect(parseKeyval('a=1,a=2')).toEqual({ a: '2' });
  });

  it('builds arrays from numeric fragments, in index order', () => {
    expect(parseKeyval('a.1=y,a.0=x,b.0.c=z')).toEqual({ a: ['x', 'y'], b: [{ c: 'z' }] });
  });

  it('desugars an implied key only for a leading bare value', () => {
    expect(parseKeyval('socket,id=c0,path=/s', 'backend')).toEqual({
      backend: 'socket',
      id: 'c0',
      path: '/s',
    });
    expect(parseKeyval('backend=socket,id=c0', 'backend')).toEqual({ backend: 'socket', id: 'c0' });
    expect(() => parseKeyval('id=c0,socket', 'backend')).toThrow(
      "Expected '=' after parameter 'socket'",
    );
  });

  it.each([
    ['a.1=x', "Parameter 'a.0' missing"],
    ['a.b=1,a=2', "Parameters 'a.*' used inconsistently"],
    ['a=2,a.b=1', "Parameters 'a.*' used inconsistently"],
    ['a.0=x,a.b=y', "Parameters 'a.*' used inconsistently"],
    ['noequals', "Expected '=' after parameter 'noequals'"],
    ['=v', "Invalid parameter ''"],
    ['a..b=1', "Invalid parameter 'a..b'"],
    ['0=x', "Invalid parameter '0'"],
    ['bad key=1', "Invalid parameter 'bad key'"],
    [`${'k'.repeat(128)}=1`, 'is too long'],
  ])('refuses %j: %s', (input, message) => {
    expect(() => parseKeyval(input)).toThrow(message);
    try {
      parseKeyval(input);
    } catch (e) {
      expect((e as { code: string }).code).toBe('ERR_VMDISK_APP_KEYVAL');
    }
  });
});
