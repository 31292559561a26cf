// Runs around every test of this package: a test that leaves an ao live fails, with the
// kind, age and creation stack of each leaked ao in the message.
import { afterEach } from 'vitest';
import { assertNoLiveAos } from '../src/index.ts';

afterEach(() => {
  assertNoLiveAos();
});
