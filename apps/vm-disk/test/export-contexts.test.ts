// The meta contexts an NBD export offers, as qemu-storage-daemon 7.2 offers them for the
// same --export options: qemu:allocation-depth only with allocation-depth=on.
import { rmSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, startQsd, useScratch } from './harness/daemon.ts';

const scratch = useScratch('vmdisk-export-contexts-');

describe('NBD export meta contexts', () => {
  it('offers qemu:allocation-depth only when asked, as qemu-storage-daemon', async () => {
    const img = scratch.path('d.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    const sock = scratch.path('nbd.sock');
    const args = [
      '--blockdev',
      `driver=file,node-name=f,filename=${img}`,
      '--blockdev',
      'driver=qcow2,node-name=d,file=f',
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=plain,node-name=d,name=plain',
      '--export',
      'type=nbd,id=depth,node-name=d,name=depth,allocation-depth=on',
    ];
    const contexts = async () => {
      const out: Record<string, unknown> = {};
      for (const name of ['plain', 'depth']) {
        const info = JSON.parse(
          await run('nbdinfo', ['--json', `nbd+unix:///${name}?socket=${sock}`]),
        ) as { exports: { contexts: string[] }[] };
        out[name] = info.exports[0]!.contexts;
      }
      return out;
    };
    const qmp = scratch.path('qmp');
    const ours = await scratch.serve([...monitorArgs(qmp), ...args]);
    const seenOurs = await contexts();
    await ours.stop();
    rmSync(sock, { force: true });
    // Its NBD socket comes last (after the monitor's): wait for it.
    const qsd = await startQsd([...monitorArgs(qmp), ...args], sock);
    scratch.running.push(qsd);
    expect(seenOurs).toEqual(await contexts());
    expect(seenOurs).toEqual({
      plain: ['base:allocation'],
      depth: ['base:allocation', 'qemu:allocation-depth'],
    });
  });
});
