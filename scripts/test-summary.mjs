// Adds up the vitest JSON reports of the projects (<project>/.reports/vitest.json) and
// prints the closing line 'N passed, N failed, N skipped'. Exits 1 when a test failed or
// was skipped (a skipped test is a failing test here), or when no test ran.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

const root = join(import.meta.dirname, '..');
const totals = { passed: 0, failed: 0, skipped: 0 };
const lines = [];
for (const group of ['packages', 'apps', 'tools']) {
  if (!existsSync(join(root, group))) continue;
  for (const project of readdirSync(join(root, group)).sort()) {
    const report = join(root, group, project, '.reports', 'vitest.json');
    if (!existsSync(report)) continue;
    const r = JSON.parse(readFileSync(report, 'utf8'));
    const skipped = (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0);
    totals.passed += r.numPassedTests;
    totals.failed += r.numFailedTests;
    totals.skipped += skipped;
    lines.push(
      `  ${`${group}/${project}`.padEnd(24)} ${r.numPassedTests} passed, ${r.numFailedTests} failed, ${skipped} skipped`,
    );
  }
}
console.log(`\nTests by project:\n${lines.join('\n')}`);
const total = totals.passed + totals.failed + totals.skipped;
console.log(`${totals.passed} passed, ${totals.failed} failed, ${totals.skipped} skipped`);
process.exitCode = totals.failed > 0 || totals.skipped > 0 || total === 0 ? 1 : 0;
