// `rbd:` image names parsed as QEMU 7.2's qemu_rbd_parse_filename parses them (no cluster
// needed: the options they stand for).
import { describe, expect, it } from 'vitest';
import { rbdFilename } from '../src/img/rbd-name.ts';

describe('rbd: names', () => {
  it('pool, namespace, image, snapshot and key=value options', () => {
    expect(rbdFilename('rbd:pool/image')).toEqual({ driver: 'rbd', pool: 'pool', image: 'image' });
    expect(
      rbdFilename('rbd:p/ns/img@snap:conf=/etc/c.conf:id=alice:rados_osd_op_timeout=5'),
    ).toEqual({
      driver: 'rbd',
      pool: 'p',
      namespace: 'ns',
      image: 'img',
      snapshot: 'snap',
      conf: '/etc/c.conf',
      user: 'alice',
      '=keyvalue-pairs': JSON.stringify(['rados_osd_op_timeout', '5']),
    });
  });

  it('a backslash escapes a delimiter (mon_host with ports)', () => {
    expect(rbdFilename('rbd:p/i:mon_host=10.0.0.1\\:6789;10.0.0.2\\:6789')).toEqual({
      driver: 'rbd',
      pool: 'p',
      image: 'i',
      '=keyvalue-pairs': JSON.stringify(['mon_host', '10.0.0.1:6789;10.0.0.2:6789']),
    });
    expect(rbdFilename('rbd:p/a\\@b')).toEqual({ driver: 'rbd', pool: 'p', image: 'a@b' });
  });

  it("QEMU's errors: no pool, an option without a value; other names are not rbd's", () => {
    expect(() => rbdFilename('rbd:image')).toThrow('Pool name is required');
    expect(() => rbdFilename('rbd:p/i:conf')).toThrow('conf option conf has no value');
    expect(rbdFilename('/var/lib/disk.img')).toBeUndefined();
    expect(rbdFilename('nbd://host/x')).toBeUndefined();
  });
});
