// The container harness: privileged, host-network containers from the local base image
// (scripts/base-image.sh), started with testcontainers as docs/testing.md says (no
// reaper, host override), used through exec, and always removed.
import type { StartedTestContainer } from 'testcontainers';

// testcontainers reads these when it first talks to Docker; they are set before it loads.
process.env.TESTCONTAINERS_RYUK_DISABLED ??= 'true';
process.env.TESTCONTAINERS_HOST_OVERRIDE ??= '127.0.0.1';
const { GenericContainer, Wait } = await import('testcontainers');

/** The base image; scripts/setup-test-env.sh builds it and points this tag at it. */
export const BASE_IMAGE = process.env.VMDISK_BASE_IMAGE ?? 'vmdisk-base:current';
const READY = 'vmdisk-container-ready';

export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

export interface ContainerOptions {
  image?: string;
  /** Host directories to bind into the container: `{ source, target, mode }`. */
  binds?: { source: string; target: string; mode?: 'ro' | 'rw' }[];
}

export class CommandFailed extends Error {
  override name = 'CommandFailed';
  constructor(
    readonly command: string,
    readonly result: ExecResult,
  ) {
    super(`'${command}' exited ${result.exitCode}\n${result.stdout}${result.stderr}`);
  }
}

export class PrivilegedContainer {
  private constructor(private readonly container: StartedTestContainer) {}

  static async start(options: ContainerOptions = {}): Promise<PrivilegedContainer> {
    const started = await new GenericContainer(options.image ?? BASE_IMAGE)
      .withPrivilegedMode()
      .withNetworkMode('host')
      .withBindMounts(options.binds ?? [])
      .withCommand(['sh', '-c', `echo ${READY}; exec sleep infinity`])
      .withWaitStrategy(Wait.forLogMessage(READY))
      .withStartupTimeout(60_000)
      .start();
    return new PrivilegedContainer(started);
  }

  get id(): string {
    return this.container.getId();
  }

  /** Runs a shell command line in the container; resolves whatever its exit status. */
  async exec(command: string): Promise<ExecResult> {
    const { exitCode, stdout, stderr } = await this.container.exec(['sh', '-c', command]);
    return { exitCode, stdout, stderr };
  }

  /** Runs a shell command line; rejects with CommandFailed unless it exits 0. */
  async run(command: string): Promise<string> {
    const result = await this.exec(command);
    if (result.exitCode !== 0) throw new CommandFailed(command, result);
    return result.stdout;
  }

  /** Stops and removes the container (and its anonymous volumes). */
  async remove(): Promise<void> {
    await this.container.stop({ timeout: 0, remove: true, removeVolumes: true });
  }
}

/** Starts a container, hands it to `fn`, and removes it however `fn` ends. */
export async function withPrivilegedContainer<T>(
  fn: (container: PrivilegedContainer) => Promise<T>,
  options?: ContainerOptions,
): Promise<T> {
  const container = await PrivilegedContainer.start(options);
  try {
    return await fn(container);
  } finally {
    await container.remove();
  }
}
