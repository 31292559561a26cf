// The process's own metrics, under prom-client's default names (process_*, nodejs_*), read
// at scrape time only. prom-client's collectDefaultMetrics would do it, but it also watches
// every garbage collection (a PerformanceObserver calling into JS at each scavenge, which
// at 100k requests a second is thousands of calls) and samples the event loop's delay on a
// timer: a cost paid between scrapes, by the I/O, which the metrics must not have.
import { readdirSync, readFileSync } from 'node:fs';

export interface ProcessSample {
  name: string;
  help: string;
  type: 'counter' | 'gauge';
  value: number;
  labels?: Record<string, string>;
}

const startTime = Math.round(Date.now() / 1000 - process.uptime());

/** The open-files limit (from /proc/self/limits), or undefined where it cannot be read. */
function maxFds(): number | undefined {
  try {
    const line = readFileSync('/proc/self/limits', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('Max open files'));
    const n = Number(line?.split(/\s+/)[3]);
    return Number.isFinite(n) ? n : undefined;
  } catch {
    return undefined;
  }
}

function openFds(): number | undefined {
  try {
    return readdirSync('/proc/self/fd').length - 1; // less the directory's own fd
  } catch {
    return undefined;
  }
}

/** One reading of the process's figures, named with `prefix`. */
export function processSamples(prefix: string): ProcessSample[] {
  const cpu = process.cpuUsage();
  const mem = process.memoryUsage();
  const out: ProcessSample[] = [
    {
      name: 'process_cpu_user_seconds_total',
      help: 'Total user CPU time spent in seconds.',
      type: 'counter',
      value: cpu.user / 1e6,
    },
    {
      name: 'process_cpu_system_seconds_total',
      help: 'Total system CPU time spent in seconds.',
      type: 'counter',
      value: cpu.system / 1e6,
    },
    {
      name: 'process_cpu_seconds_total',
      help: 'Total user and system CPU time spent in seconds.',
      type: 'counter',
      value: (cpu.user + cpu.system) / 1e6,
    },
    {
      name: 'process_resident_memory_bytes',
      help: 'Resident memory size in bytes.',
      type: 'gauge',
      value: mem.rss,
    },
    {
      name: 'process_start_time_seconds',
      help: 'Start time of the process since unix epoch in seconds.',
      type: 'gauge',
      value: startTime,
    },
    {
      name: 'nodejs_heap_size_total_bytes',
      help: 'Process heap size from Node.js in bytes.',
      type: 'gauge',
      value: mem.heapTotal,
    },
    {
      name: 'nodejs_heap_size_used_bytes',
      help: 'Process heap size used from Node.js in bytes.',
      type: 'gauge',
      value: mem.heapUsed,
    },
    {
      name: 'nodejs_external_memory_bytes',
      help: 'Node.js external memory size in bytes.',
      type: 'gauge',
      value: mem.external,
    },
    {
      name: 'nodejs_version_info',
      help: 'Node.js version info.',
      type: 'gauge',
      value: 1,
      labels: { version: process.version },
    },
  ];
  const open = openFds();
  if (open !== undefined) {
    out.push({
      name: 'process_open_fds',
      help: 'Number of open file descriptors.',
      type: 'gauge',
      value: open,
    });
  }
  const max = maxFds();
  if (max !== undefined) {
    out.push({
      name: 'process_max_fds',
      help: 'Maximum number of open file descriptors.',
      type: 'gauge',
      value: max,
    });
  }
  return out.map((s) => ({ ...s, name: prefix + s.name }));
}
