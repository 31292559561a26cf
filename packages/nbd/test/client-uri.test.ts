// NBD URIs (doc/uri.md of the nbd project) as parseNbdUri reads them.

import { describe, expect, it } from 'vitest';
import { NbdClient, parseNbdUri } from '../src/index.ts';

describe('parseNbdUri', () => {
  it('reads TCP URIs with the default port and the export name from the path', () => {
    expect(parseNbdUri('nbd://example.com/disk')).toEqual({
      transport: { host: 'example.com', port: 10809 },
      exportName: 'disk',
      tls: false,
      tlsOptions: {},
    });
    expect(parseNbdUri('nbd://127.0.0.1:12345').exportName).toBe('');
    expect(parseNbdUri('nbd://example.com/').exportName).toBe('');
    expect(parseNbdUri('nbd://example.com//disk').exportName).toBe('/disk');
    expect(parseNbdUri('nbd://example.com/hello%20world').exportName).toBe('hello world');
    expect(parseNbdUri('nbd://[::1]:10810/x').transport).toEqual({ host: '::1', port: 10810 });
  });

  it('reads unix-socket URIs and the TLS schemes and parameters', () => {
    expect(parseNbdUri('nbd+unix:///disk?socket=/run/nbd.sock')).toMatchObject({
      transport: { path: '/run/nbd.sock' },
      exportName: 'disk',
      tls: false,
    });
    expect(parseNbdUri('nbd+unix:///?socket=%00/abstract').transport).toEqual({
      path: '\0/abstract',
    });
    const s = parseNbdUri(
      'nbds+unix://alice@/e?socket=/s&tls-psk-file=/k.psk&tls-hostname=h&tls-verify-peer=0&x-foo=1',
    );
    expect(s).toEqual({
      transport: { path: '/s' },
      exportName: 'e',
      tls: true,
      tlsOptions: { username: 'alice', pskFile: '/k.psk', hostname: 'h', verifyPeer: false },
    });
    const x = parseNbdUri('nbds://h:1/?tls-type=x509&tls-certificates=/etc/pki/qemu');
    expect(x.tls).toBe(true);
    expect(x.tlsOptions).toEqual({ type: 'x509', certificatesDir: '/etc/pki/qemu' });
  });

  it('rejects malformed URIs with ERR_VMDISK_NBD_INVALID_URI', () => {
    for (const bad of [
      'http://example.com/disk',
      'nbd:/disk',
      'nbd://',
      'nbd://host:99999/',
      'nbd://host:0/',
      'nbd://host:port/',
      'nbd+unix:///disk',
      'nbd+unix://host/disk?socket=/s',
      'nbd://host/disk?socket=/s',
      'nbd://host/disk?bogus=1',
      'nbd://host/%zz',
      'nbd://host/a%00b',
      'nbds://host/?tls-type=anon',
      'nbds://host/?tls-verify-peer=yes',
      'nbd://[::1/',
    ]) {
      expect(() => parseNbdUri(bad), bad).toThrow(
        expect.objectContaining({ code: 'ERR_VMDISK_NBD_INVALID_URI' }),
      );
    }
  });

  it('makes connect reject (not throw) on a bad URI', async () => {
    const p = NbdClient.connect('nbd://host/?nope=1');
    await expect(p).rejects.toMatchObject({ code: 'ERR_VMDISK_NBD_INVALID_URI' });
    // PSK asked for, but no key named: refused before any connection is made.
    await expect(NbdClient.connect('nbds://127.0.0.1:1/?tls-type=psk')).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_INVALID_URI',
    });
  });
});
