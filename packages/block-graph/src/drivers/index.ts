// The built-in drivers.

import type { BlockDriver } from '../driver.ts';
import { blkdebugDriver } from './blkdebug.ts';
import { bochsDriver } from './bochs.ts';
import { copyBeforeWriteDriver } from './copy-before-write.ts';
import { copyOnReadDriver } from './copy-on-read.ts';
import { fileDriver } from './file.ts';
import { nbdDriver } from './nbd.ts';
import { nullCoDriver } from './null-co.ts';
import { qcow2Driver } from './qcow2/qcow2.ts';
import { rawDriver } from './raw.ts';
import { rbdDriver } from './rbd.ts';
import { snapshotAccessDriver } from './snapshot-access.ts';
import { throttleDriver } from './throttle.ts';

export const builtinDrivers: readonly BlockDriver[] = [
  fileDriver,
  nullCoDriver,
  nbdDriver,
  rawDriver,
  bochsDriver,
  qcow2Driver,
  throttleDriver,
  copyOnReadDriver,
  blkdebugDriver,
  copyBeforeWriteDriver,
  snapshotAccessDriver,
  rbdDriver,
];
