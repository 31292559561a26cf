// X.509 certificates for TLS tests, made with the openssl CLI: a CA, a server certificate
// for 127.0.0.1 and localhost, and a client certificate (for servers that verify clients).
import { execFile } from 'node:child_process';
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

function openssl(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('openssl', args, (err, _stdout, stderr) => {
      if (err) reject(new Error(`openssl ${args.join(' ')}: ${stderr || err.message}`));
      else resolve();
    });
  });
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
const KEY_USAGE = 'keyUsage=critical,digitalSignature,keyEncipherment';

/**
 * Makes `dir/name/server` and `dir/name/client`, the directories a tls-creds-x509 object
 * (or nbdkit's --tls-certificates) reads: ca-cert.pem and the side's WHO-cert.pem and
 * WHO-key.pem. Each call makes a CA of its own, so two calls do not trust each other.
 */
export async function makeCertificates(
  dir: string,
  name: string,
): Promise<{ server: string; client: string }> {
  const base = join(dir, name);
  const server = join(base, 'server');
  const client = join(base, 'client');
  await mkdir(server, { recursive: true });
  await mkdir(client, { recursive: true });
  const caKey = join(base, 'ca-key.pem');
  const caCert = join(base, 'ca-cert.pem');
  await openssl([
    'req',
    '-x509',
    ...EC,
    '-keyout',
    caKey,
    '-out',
    caCert,
    '-days',
    '2',
    '-subj',
    `/CN=${name} CA`,
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  const sign = async (who: string, outDir: string, ext: string) => {
    const csr = join(base, `${who}.csr`);
    const extFile = join(base, `${who}.ext`);
    await writeFile(extFile, ext);
    const key = join(outDir, `${who}-key.pem`);
    await openssl(['req', ...EC, '-keyout', key, '-out', csr, '-subj', `/CN=${who}`]);
    await openssl([
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      caCert,
      '-CAkey',
      caKey,
      '-CAcreateserial',
      '-out',
      join(outDir, `${who}-cert.pem`),
      '-days',
      '2',
      '-extfile',
      extFile,
    ]);
  };
  await sign(
    'server',
    server,
    `subjectAltName=IP:127.0.0.1,DNS:localhost\n${KEY_USAGE}\nextendedKeyUsage=serverAuth\n`,
  );
  await sign('client', client, `${KEY_USAGE}\nextendedKeyUsage=clientAuth\n`);
  await copyFile(caCert, join(server, 'ca-cert.pem'));
  await copyFile(caCert, join(client, 'ca-cert.pem'));
  return { server, client };
}
