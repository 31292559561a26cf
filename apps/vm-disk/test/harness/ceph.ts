// A single-node Ceph cluster for the RBD tests: one privileged, host-network container of
// the local Ceph image (scripts/ceph-image.sh) running one monitor on 127.0.0.1 at a free
// port (msgr2 only), one manager and one BlueStore OSD on a sparse file, pools of size 1
// and a pool with the rbd application. Its ceph.conf and admin keyring are written to a
// host directory bind-mounted at the same path, so the host's librbd (vm-disk's driver and
// qemu-storage-daemon's) reads them as they are. Always torn down with stop().
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { StartedTestContainer } from 'testcontainers';

process.env.TESTCONTAINERS_RYUK_DISABLED ??= 'true';
process.env.TESTCONTAINERS_HOST_OVERRIDE ??= '127.0.0.1';
const { GenericContainer, Wait } = await import('testcontainers');

/** The Ceph image; scripts/setup-test-env.sh builds it and points this tag at it. */
export const CEPH_IMAGE = process.env.VMDISK_CEPH_IMAGE ?? 'vmdisk-ceph:current';
const READY = 'vmdisk-ceph-ready';
/** The pool with the rbd application enabled. */
export const POOL = 'rbd';

/** A TCP port free on the host now (the container shares the host's network). */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

// The cluster's bootstrap, run as the container's command: manual deployment after
// Ceph's documentation, every path under DIR. Client settings go in [client] only, so
// that host clients neither write logs nor open admin sockets there.
const BOOTSTRAP = String.raw`
set -eu
DIR=$1; PORT=$2
FSID=$(cat /proc/sys/kernel/random/uuid)
CONF=$DIR/ceph.conf
mkdir -p $DIR/mon/a $DIR/mgr/x $DIR/osd/0 $DIR/run $DIR/log
cat >$CONF <<EOF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$PORT]
mon initial members = a
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
[mon]
mon data = $DIR/mon/\$id
mon data avail warn = 1
mon data avail crit = 0
[mgr]
mgr data = $DIR/mgr/\$id
[osd]
osd data = $DIR/osd/\$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 4294967296
osd memory target = 939524096
osd max object name len = 256
[mon.a]
keyring = $DIR/mon/a/keyring
log file = $DIR/log/mon.a.log
pid file = $DIR/run/mon.a.pid
admin socket = $DIR/run/mon.a.asok
[mgr.x]
keyring = $DIR/mgr/x/keyring
log file = $DIR/log/mgr.x.log
pid file = $DIR/run/mgr.x.pid
admin socket = $DIR/run/mgr.x.asok
[osd.0]
keyring = $DIR/osd/0/keyring
log file = $DIR/log/osd.0.log
pid file = $DIR/run/osd.0.pid
admin socket = $DIR/run/osd.0.asok
[client]
keyring = $DIR/ceph.client.admin.keyring
log file = /dev/null
admin socket =
EOF
ceph-authtool --create-keyring $DIR/mon.keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring $DIR/ceph.client.admin.keyring --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool $DIR/mon.keyring --import-keyring $DIR/ceph.client.admin.keyring >/dev/null
chmod 644 $DIR/ceph.client.admin.keyring
monmaptool --create --addv a "[v2:127.0.0.1:$PORT]" --fsid $FSID $DIR/monmap >/dev/null
ceph-mon -c $CONF --mkfs -i a --monmap $DIR/monmap --keyring $DIR/mon.keyring
ceph-mon -c $CONF -i a
ceph -c $CONF auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o $DIR/mgr/x/keyring
ceph-mgr -c $CONF -i x
UUID=$(cat /proc/sys/kernel/random/uuid)
ceph -c $CONF osd new $UUID >/dev/null
ceph -c $CONF auth get-or-create osd.0 mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' -o $DIR/osd/0/keyring
ceph-osd -c $CONF -i 0 --mkfs --osd-uuid $UUID 2>&1 | tail -3
ceph-osd -c $CONF -i 0
ceph -c $CONF osd pool create ${POOL} 8 8 >/dev/null
ceph -c $CONF osd pool set ${POOL} size 1 --yes-i-really-mean-it >/dev/null
ceph -c $CONF osd pool application enable ${POOL} rbd >/dev/null
until ceph -c $CONF osd dump | grep -q '^osd.0 up'; do sleep 0.2; done
rbd -c $CONF pool init ${POOL}
echo ${READY}
exec sleep infinity
`;

export class CephCluster {
  private readonly container: StartedTestContainer;
  /** The host directory holding ceph.conf, the admin keyring and the daemons' data. */
  readonly dir: string;
  readonly monPort: number;

  private constructor(container: StartedTestContainer, dir: string, monPort: number) {
    this.container = container;
    this.dir = dir;
    this.monPort = monPort;
  }

  static async start(): Promise<CephCluster> {
    const dir = mkdtempSync(join(tmpdir(), 'vmdisk-ceph-'));
    const port = await freePort();
    try {
      const container = await new GenericContainer(CEPH_IMAGE)
        .withPrivilegedMode()
        .withNetworkMode('host')
        .withBindMounts([{ source: dir, target: dir, mode: 'rw' }])
        .withCommand(['bash', '-c', BOOTSTRAP, 'bootstrap', dir, String(port)])
        .withWaitStrategy(Wait.forLogMessage(READY))
        .withStartupTimeout(120_000)
        .start();
      return new CephCluster(container, dir, port);
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  get conf(): string {
    return join(this.dir, 'ceph.conf');
  }

  /** The admin key (base64), as a `secret` object would hold it. */
  async adminKey(): Promise<string> {
    return (await this.run(`ceph-authtool -p ${this.dir}/ceph.client.admin.keyring`)).trim();
  }

  /** Runs a shell command line in the container; rejects unless it exits 0. */
  async run(command: string): Promise<string> {
    const { exitCode, stdout, stderr } = await this.container.exec(['bash', '-c', command]);
    if (exitCode !== 0) throw new Error(`'${command}' exited ${exitCode}\n${stdout}${stderr}`);
    return stdout;
  }

  /** `rbd ARGS` against the cluster (in the container). */
  rbd(args: string): Promise<string> {
    return this.run(`rbd -c ${this.conf} ${args}`);
  }

  /** Kills the OSD (SIGKILL): its requests hang until it is back. */
  async killOsd(): Promise<void> {
    await this.run(`kill -9 $(cat ${this.dir}/run/osd.0.pid); rm -f ${this.dir}/run/osd.0.pid`);
  }

  /** Starts the OSD again and waits until the monitor has it up. */
  async restartOsd(): Promise<void> {
    await this.run(
      `ceph-osd -c ${this.conf} -i 0 && until ceph -c ${this.conf} osd dump | grep -q '^osd.0 up'; do sleep 0.2; done`,
    );
  }

  async stop(): Promise<void> {
    try {
      await this.container.stop({ timeout: 0, remove: true, removeVolumes: true });
    } finally {
      rmSync(this.dir, { recursive: true, force: true });
    }
  }
}
