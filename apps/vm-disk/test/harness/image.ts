// Builds the vm-disk container image on the local base image (scripts/build-image.mjs
// bundles the CLI from src and runs `docker build`), for container tests to run it.
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { BASE_IMAGE } from './container.ts';

const SCRIPT = fileURLToPath(new URL('../../scripts/build-image.mjs', import.meta.url));

/** Builds the vm-disk image as `tag` on the base image; returns the tag. */
export function buildVmDiskImage(tag: string): string {
  execFileSync(process.execPath, [SCRIPT, '--base', BASE_IMAGE, '--tag', tag], {
    stdio: 'inherit',
  });
  return tag;
}
