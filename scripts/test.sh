#!/usr/bin/env bash
# Runs every test of the repository, unit and container, after setting up what they need
# (Node 24, npm dependencies, Debian packages, the Docker engine, the base image), and
# ends with the count of tests run. Fails when any test fails or is skipped.
# Extra arguments go to `nx run-many` (e.g. --projects=@vmdisk/nbd).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$VMDISK_ROOT"

start=$SECONDS
bootstrap
VMDISK_BASE_IMAGE=$(scripts/setup-test-env.sh)
export VMDISK_BASE_IMAGE
log "setup done in $((SECONDS - start)) s (Node $(node --version), base image $VMDISK_BASE_IMAGE)"

rm -rf packages/*/.reports apps/*/.reports tools/*/.reports
status=0
# CI runs every task afresh; elsewhere nx replays what has not changed since the last run.
cache=()
[ "${CI:-}" = true ] && cache=(--skip-nx-cache)
nx run-many -t lint typecheck test build --outputStyle=stream "${cache[@]}" "$@" || status=$?
node scripts/test-summary.mjs || status=1
exit $status
