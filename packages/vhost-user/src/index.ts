// The public surface of @vmdisk/vhost-user: what is not exported here is internal.
export { VhostUserError } from './errors.ts';
export type { VhostUserBlkOptions } from './server.ts';
export { VhostUserBlkServer } from './server.ts';
