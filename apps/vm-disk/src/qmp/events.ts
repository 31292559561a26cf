// The events the monitor sends, with their data as QEMU 7.2's schema gives it
// (qapi/job.json, block-core.json, block-export.json), declared for query-qmp-schema.
import { JOB_STATUSES, JOB_TYPES } from '@vmdisk/ao';
import { schema } from '@vmdisk/block-graph';
import type { QmpMonitor } from './monitor.ts';

const { enumOf, int, opt, str, struct } = schema;

const jobType = enumOf(JOB_TYPES);

/** BLOCK_JOB_COMPLETED / CANCELLED / READY's common data. */
const blockJobEnd = {
  type: jobType,
  device: str,
  len: int(),
  offset: int(),
  speed: int(),
};

export function declareEvents(monitor: QmpMonitor): void {
  monitor.declareEvent('JOB_STATUS_CHANGE', struct({ id: str, status: enumOf(JOB_STATUSES) }));
  monitor.declareEvent('BLOCK_JOB_COMPLETED', struct({ ...blockJobEnd, error: opt(str) }));
  monitor.declareEvent('BLOCK_JOB_CANCELLED', struct(blockJobEnd));
  monitor.declareEvent('BLOCK_JOB_READY', struct(blockJobEnd));
  monitor.declareEvent('BLOCK_JOB_PENDING', struct({ type: jobType, id: str }));
  monitor.declareEvent(
    'BLOCK_JOB_ERROR',
    struct({
      device: str,
      operation: enumOf(['read', 'write']),
      action: enumOf(['ignore', 'report', 'stop']),
    }),
  );
  monitor.declareEvent('BLOCK_EXPORT_DELETED', struct({ id: str }));
  monitor.declareEvent(
    'BLOCK_WRITE_THRESHOLD',
    struct({ 'node-name': str, 'amount-exceeded': int(), 'write-threshold': int() }),
  );
}
